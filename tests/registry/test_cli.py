"""Round trips through broker-admin as a real subprocess."""

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

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
