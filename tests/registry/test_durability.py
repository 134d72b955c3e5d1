"""The durability rule under a real ``kill -9`` of a writer process."""

import os
import select
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from broker.registry.admin import AdminDatabase

DEVICES = ("d0", "d1", "d2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE = 60.0   # seconds a child may take to produce its acks


class KillTests(SynchronousTestCase):
    """Everything acknowledged as durable before SIGKILL is there after reopening."""

    def run_and_kill(self, data_dir, acks_wanted):
        """Run a writer child, SIGKILL it after ``acks_wanted`` acks; return the last ack per device."""
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.registry.writer_process", data_dir, *DEVICES],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        acked = {}
        seen = 0
        buffered = b""
        end = time.monotonic() + DEADLINE
        while seen < acks_wanted:
            left = end - time.monotonic()
            self.assertGreater(left, 0, "writer child produced too few acks")
            ready, _, _ = select.select([child.stdout], [], [], left)
            chunk = os.read(child.stdout.fileno(), 65536) if ready else b""
            if ready and not chunk:
                self.fail("writer child exited: " + child.stderr.read().decode()[-2000:])
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                parts = line.split()
                if parts[:1] == [b"ACK"]:
                    name, version, value = parts[1].decode(), int(parts[2]), int(parts[3])
                    acked[name] = max(acked.get(name, (0, 0)), (version, value))
                    seen += 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        return acked

    def check(self, data_dir, acked):
        admin = AdminDatabase(data_dir)
        try:
            views = {v.name: v for v in admin.devices()}
        finally:
            admin.close()
        for name, (version, value) in acked.items():
            self.assertGreaterEqual(views[name].version, version)
            self.assertGreaterEqual(views[name].reported["counter"], value)
        return views

    def test_kill_loses_nothing_acknowledged(self):
        """Two rounds of write-then-SIGKILL: every acked state survives, and the second round
        continues above the first."""
        data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        admin = AdminDatabase(data_dir, create=True)
        for name in DEVICES:
            admin.add_device(name)
        admin.close()
        first = self.run_and_kill(data_dir, 1500)
        views = self.check(data_dir, first)
        second = self.run_and_kill(data_dir, 700)
        self.check(data_dir, second)
        for name in DEVICES:
            self.assertGreater(second[name][0], views[name].version)
