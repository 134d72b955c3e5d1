"""Round trips through broker-admin as a real subprocess."""

import io
import json
import os
import sqlite3
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from broker.registry import cli
from broker.registry.secrets import parse_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CLITests(SynchronousTestCase):
    """broker-admin device and token commands."""

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))

    def admin(self, *args, json_out=True, expect=0):
        argv = [sys.executable, "-m", "broker.registry.cli", "--data-dir", self.data_dir]
        argv += ["--json"] if json_out else []
        done = subprocess.run(argv + list(args), cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, expect, done.stderr)
        if expect:
            self.assertEqual(len(done.stderr.strip().splitlines()), 1)
            return done.stderr
        return json.loads(done.stdout) if json_out else done.stdout

    def test_device_round_trip(self):
        """add prints number and key once; list, show, rotate-key and remove agree."""
        added = self.admin("device", "add", "greenhouse-7")
        self.assertEqual(len(parse_key(added["key"])), 16)
        listed = self.admin("device", "list")
        self.assertEqual([(d["name"], d["device_number"]) for d in listed],
                         [("greenhouse-7", added["device_number"])])
        shown = self.admin("device", "show", "greenhouse-7")
        self.assertEqual((shown["name"], shown["reported"], shown["version"]), ("greenhouse-7", {}, 1))
        rotated = self.admin("device", "rotate-key", "greenhouse-7")
        self.assertNotEqual(rotated["key"], added["key"])
        self.assertEqual(rotated["device_number"], added["device_number"])
        self.admin("device", "remove", "greenhouse-7")
        self.assertEqual(self.admin("device", "list"), [])

    def test_human_output(self):
        """Without --json, output is for people and still carries the key."""
        text = self.admin("device", "add", "barn", json_out=False)
        self.assertIn("key", text)
        self.assertIn("barn", self.admin("device", "list", json_out=False))

    def test_token_round_trip(self):
        """token add prints the token once; list never shows it; revoke removes it."""
        made = self.admin("token", "add", "--role", "read")
        listed = self.admin("token", "list")
        self.assertEqual([(t["token_id"], t["role"]) for t in listed], [(made["token_id"], "read")])
        self.assertNotIn(made["token"], json.dumps(listed))
        self.admin("token", "revoke", made["token_id"])
        self.assertEqual(self.admin("token", "list"), [])

    def test_errors_are_one_line(self):
        """Errors give one clear line and a non-zero exit."""
        self.admin("device", "add", "d")
        self.assertIn("already exists", self.admin("device", "add", "d", json_out=False, expect=1))
        self.assertIn("unknown device", self.admin("device", "show", "x", json_out=False, expect=1))
        self.assertIn("unknown_token", self.admin("token", "revoke", "zz", expect=1))
        self.assertIn("invalid device name", self.admin("device", "add", "a b", json_out=False, expect=1))

    def test_missing_data_dir(self):
        """Reading a data directory that does not exist is an error, not a new database."""
        self.assertIn("no data directory", self.admin("device", "list", json_out=False, expect=1))
        self.assertFalse(os.path.exists(self.data_dir))

    def test_options_after_the_command(self):
        """--json, --data-dir and --config are accepted after the command too (broker-admin device list --json)."""
        self.admin("device", "add", "after")
        done = subprocess.run([sys.executable, "-m", "broker.registry.cli", "device", "list",
                               "--json", "--data-dir", self.data_dir],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([d["name"] for d in json.loads(done.stdout)], ["after"])

    def test_new_store_is_announced(self):
        """add on a data directory with no database says on stderr where it created one; a second add does not."""
        done = subprocess.run([sys.executable, "-m", "broker.registry.cli", "--data-dir",
                               self.data_dir, "device", "add", "a"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, f"broker-admin: created a new registry database in "
                                      f"{self.data_dir} (is it the broker's data_dir?)\n")
        again = subprocess.run([sys.executable, "-m", "broker.registry.cli", "--data-dir",
                                self.data_dir, "device", "add", "c"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual((again.returncode, again.stderr), (0, ""))


class CLIFailureTests(SynchronousTestCase):
    """Failures of the database itself are one line and exit status 1, never a traceback."""

    def run_failing(self, problem):
        def failing(*args, **kwargs):
            raise problem
        self.patch(cli, "AdminDatabase", failing)
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.mktemp(), "device", "list"], out, err)
        return status, err.getvalue()

    def test_file_it_may_not_touch(self):
        """A database file owned by another user (chmod refused) names the file."""
        # Root may chmod any file: the refusal another user meets is raised here.
        status, message = self.run_failing(PermissionError(1, "Operation not permitted",
                                                           "data/registry.sqlite3"))
        self.assertEqual((status, message), (1, "broker-admin: cannot use 'data/registry.sqlite3': "
                                                "Operation not permitted\n"))

    def test_database_error(self):
        """An SQLite error (read-only or locked database) is one line naming the database."""
        status, message = self.run_failing(sqlite3.OperationalError("database is locked"))
        self.assertEqual((status, message),
                         (1, "broker-admin: the registry database: database is locked\n"))
