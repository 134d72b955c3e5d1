"""The way out of a refusal on a Redis that lost data: the refusal spells the command
with the data directory absolute, and that command works from any working directory
(broker-admin takes a relative data_dir from its own, not the broker's)."""

import os
import re
import shlex

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry.redis_marker import MarkerMismatch, OlderCopy, RememberedMarker

from .redis_support import AdminOnRedis


def in_directory(testcase, path):
    """Make path the working directory until the test ends (an operator's shell elsewhere)."""
    os.makedirs(path, exist_ok=True)
    previous = os.getcwd()
    os.chdir(path)
    testcase.addCleanup(os.chdir, previous)


def command_in(message):
    """The broker-admin command a refusal spells, as argv without the program name."""
    found = re.search(r"`(broker-admin [^`]*)`", message)
    assert found, message
    return shlex.split(found.group(1))[1:]


class RefusalCommandTests(SynchronousTestCase):
    """The commands in the refusals name the data directory absolute, quoted for a shell."""

    def test_both_refusals_name_the_absolute_data_directory(self):
        """MarkerMismatch and OlderCopy spell `broker-admin redis adopt-new` / `restored`
        with --data-dir and the absolute path, quoted when it holds a space."""
        data_dir = os.path.abspath(self.mktemp() + " state")
        remembered = RememberedMarker(data_dir, "redis://127.0.0.1:6379/0", "ssp")
        with self.assertRaises(MarkerMismatch) as mismatch:
            remembered.check(None, "{ssp}:incarnation", "a" * 32)
        self.assertEqual(command_in(str(mismatch.exception)),
                         ["redis", "adopt-new", "--config", "CONFIG", "--data-dir", data_dir])
        self.assertIn("as the broker's user", str(mismatch.exception))
        with self.assertRaises(OlderCopy) as older:
            remembered.check_sequence("a" * 32, 5, 9, "{ssp}:seq")
        self.assertEqual(command_in(str(older.exception)),
                         ["redis", "restored", "--config", "CONFIG", "--data-dir", data_dir])


class RecoveryFromElsewhereTests(AdminOnRedis, TestCase):
    """A broker config with the shipped relative data_dir, the broker run from its state
    directory, broker-admin from another one (the unit's WorkingDirectory vs a shell)."""

    timeout = 60

    def setUp(self):
        super().setUp()
        base = os.path.abspath(self.mktemp())
        self.state = os.path.join(base, "state")            # the broker's working directory
        self.home = os.path.join(base, "home")              # the operator's shell
        self.data_dir = os.path.join(self.state, "broker-data")
        with open(self.config, "w") as handle:
            handle.write(f'[broker]\ndata_dir = "broker-data"\n'
                         f'[registry]\nbackend = "redis"\nredis_url = "{self.url}"\n')

    @defer.inlineCallbacks
    def refused_after_flushall(self):
        registry = self.open_registry()
        yield registry.stop()
        self.direct.flushall()
        with self.assertRaises(MarkerMismatch) as refused:
            self.open_registry()
        return str(refused.exception)

    @defer.inlineCallbacks
    def test_the_spelt_command_lets_the_broker_start_again(self):
        """The command of the refusal, run from another directory with the config file
        for CONFIG, makes the broker's data directory serve the new data set: the next
        start succeeds (before, the documented command recorded it in $PWD/broker-data)."""
        message = yield self.refused_after_flushall()
        in_directory(self, self.home)
        argv = [self.config if word == "CONFIG" else word for word in command_in(message)]
        code, _, err = self.admin(*argv)
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(os.path.exists(os.path.join(self.home, "broker-data")))
        registry = self.open_registry()
        self.assertEqual(registry._store.incarnation,
                         RememberedMarker.for_options(self.data_dir, self.options).read())

    @defer.inlineCallbacks
    def test_a_relative_data_dir_remembering_nothing_is_noted(self):
        """broker-admin run from another directory with the relative data_dir says on
        stderr where it took it from and to give --data-dir (it still does the work)."""
        yield self.refused_after_flushall()
        in_directory(self, self.home)
        code, _, err = self.admin("redis", "adopt-new")
        self.assertEqual(code, 0)
        self.assertIn(f"broker.data_dir 'broker-data' is relative, so it was taken from this "
                      f"working directory as {os.path.join(self.home, 'broker-data')}", err)
        self.assertIn("--data-dir /absolute/path", err)
        self.assertRaises(MarkerMismatch, self.open_registry)
