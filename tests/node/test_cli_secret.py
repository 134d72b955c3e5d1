"""Where broker-node run takes its device key from: never only the command line.

A process's command line is readable by every user of the host
(/proc/PID/cmdline, ``ps``), so the key can come from a private file
(``--secret-file``) or the environment (``BROKER_NODE_SECRET``, readable by
the same user only); ``--secret KEY`` still works, with a warning.
"""

import argparse
import io
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.node.cli import SECRET_ENV, UsageError, resolve_secret
from broker.ssp.keys import format_key
from tests.helpers import loopback_config, start_broker
from tests.node.test_cli import key_file, spawn_node
from tests.udp.loopback import wait_until

SECRET = bytes(range(16))
TEXT = format_key(SECRET)


def arguments(secret=None, secret_file=None):
    return argparse.Namespace(secret=secret, secret_file=secret_file)


class SecretSourceTests(SynchronousTestCase):
    """resolve_secret: one source, precise refusals that never quote the key."""

    def resolve(self, args, environ=None):
        err = io.StringIO()
        return resolve_secret(args, environ or {}, err), err.getvalue()

    def refusal(self, args, environ=None):
        with self.assertRaises(UsageError) as caught:
            self.resolve(args, environ)
        return str(caught.exception)

    def test_private_file(self):
        """A 0600 file holding the key (with a line end and blanks) gives it, silently."""
        path = key_file(self, SECRET)
        self.assertEqual(self.resolve(arguments(secret_file=path)), (SECRET, ""))

    def test_environment(self):
        """BROKER_NODE_SECRET gives the key, silently."""
        self.assertEqual(self.resolve(arguments(), {SECRET_ENV: TEXT + "\n"}), (SECRET, ""))

    def test_command_line_key_warns(self):
        """--secret KEY still works but warns that ps shows it, naming the alternatives."""
        secret, warning = self.resolve(arguments(secret=TEXT))
        self.assertEqual(secret, SECRET)
        self.assertIn("ps", warning)
        self.assertIn("--secret-file", warning)
        self.assertIn(SECRET_ENV, warning)
        self.assertNotIn(TEXT, warning)

    def test_no_key_at_all(self):
        """Without any source the answer names both private ones."""
        message = self.refusal(arguments())
        self.assertIn("--secret-file", message)
        self.assertIn(SECRET_ENV, message)

    def test_several_sources_refused(self):
        """Two sources at once are refused (which one wins would be a guess)."""
        path = key_file(self, SECRET)
        message = self.refusal(arguments(secret=TEXT, secret_file=path))
        self.assertIn("--secret-file and --secret", message)
        message = self.refusal(arguments(secret_file=path), {SECRET_ENV: TEXT})
        self.assertIn(f"--secret-file and {SECRET_ENV}", message)

    def test_file_others_may_read_refused(self):
        """A key file group or others may read is refused with its mode and the fix."""
        path = key_file(self, SECRET)
        os.chmod(path, 0o644)
        message = self.refusal(arguments(secret_file=path))
        self.assertIn("0644", message)
        self.assertIn("chmod 600", message)

    def test_unreadable_and_foreign_files_refused(self):
        """A missing file, a binary one and a bad key give one line naming the file,
        never the file's content."""
        missing = os.path.abspath(self.mktemp())
        self.assertIn("cannot read", self.refusal(arguments(secret_file=missing)))
        binary = key_file(self)
        with open(binary, "wb") as handle:
            handle.write(b"\xff\xfe secret")
        self.assertIn("22 characters", self.refusal(arguments(secret_file=binary)))
        wrong = key_file(self)
        with open(wrong, "w") as handle:
            handle.write("NOT-A-KEY-abcdefghijklmno\n")
        message = self.refusal(arguments(secret_file=wrong))
        self.assertIn(wrong, message)
        self.assertNotIn("NOT-A-KEY", message)
        message = self.refusal(arguments(), {SECRET_ENV: "NOT-A-KEY-abcdefghijklmno"})
        self.assertIn(SECRET_ENV, message)
        self.assertNotIn("NOT-A-KEY", message)


def command_line(pid) -> bytes:
    """What every user of the host reads as the process's command line."""
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read()


class KeyOffTheCommandLineTests(TestCase):
    """broker-node run as a real process against a real broker, its key never in ps."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, loopback_config(self))
        self.registry = self.broker.service.registry
        self.address = f"127.0.0.1:{self.broker.udp_port}"

    @defer.inlineCallbacks
    def check_reports(self, name, device, process, child):
        text = format_key(device.secret).encode("ascii")
        self.assertNotIn(text, command_line(process.pid))
        process.writeToChild(0, b'{"temp": 3}\n')
        yield wait_until(self, lambda: self.registry.device(name).reported.get("temp") == 3,
                         what="reported with the key from outside the command line")
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual(code, 0, child.err)
        self.assertEqual(child.err, b"")

    @defer.inlineCallbacks
    def test_key_from_a_private_file(self):
        """With --secret-file the node reports and its command line holds no key."""
        device = yield self.registry.add_device("key-file")
        process, child = spawn_node(
            self, "run", "--device", str(device.device_number),
            "--secret-file", key_file(self, device.secret), "--broker", self.address,
            "--state", os.path.abspath(self.mktemp()), "--linger", "1")
        yield self.check_reports("key-file", device, process, child)

    @defer.inlineCallbacks
    def test_key_from_the_environment(self):
        """With BROKER_NODE_SECRET the node reports and its command line holds no key."""
        device = yield self.registry.add_device("key-env")
        os.environ[SECRET_ENV] = format_key(device.secret)
        try:
            process, child = spawn_node(
                self, "run", "--device", str(device.device_number), "--broker",
                self.address, "--state", os.path.abspath(self.mktemp()), "--linger", "1")
        finally:
            del os.environ[SECRET_ENV]
        yield self.check_reports("key-env", device, process, child)
