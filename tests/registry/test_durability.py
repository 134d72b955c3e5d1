"""The durability rule under a real ``kill -9`` of a writer process, and a
dashboard's resume from a cursor it was told before the kill."""

import os
import select
import signal
import subprocess
import sys
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import errors, open_registry
from broker.registry.admin import AdminDatabase

DEVICES = ("d0", "d1", "d2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE = 60.0   # seconds a child may take to produce its acks


class _Child:
    """Runs the writer child (writer_process.py) and kills it."""

    def provisioned(self):
        """A new data directory whose registry holds DEVICES (broker-admin's way)."""
        data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        admin = AdminDatabase(data_dir, create=True)
        for name in DEVICES:
            admin.add_device(name)
        admin.close()
        return data_dir

    def run_and_kill(self, data_dir, acks_wanted, seen=None, stall=None):
        """Run a writer child, SIGKILL it after ``acks_wanted`` acks; return the last
        ack per device. ``seen``: a list that gets ``(name, cursor, counter)`` of
        every change the child's observer printed before it died, and its version. ``stall``: the
        child stops committing from that write on; killed once it says STALLED."""
        flags = ["--seen"] if seen is not None else []
        if stall is not None:
            flags += ["--stall", str(stall)]
        stalled = False
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.registry.writer_process", data_dir, *flags, *DEVICES],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        acked = {}
        acks = 0
        buffered = b""
        end = time.monotonic() + DEADLINE
        while acks < acks_wanted or (stall is not None and not stalled):
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
                    acks += 1
                elif parts[:1] == [b"STALLED"]:
                    stalled = True
                elif parts[:1] == [b"SEEN"] and seen is not None:
                    seen.append((parts[1].decode(), int(parts[2]), int(parts[3]), int(parts[4])))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if seen is not None:
            # What the child wrote before it died is what a dashboard saw (a
            # line cut short by the kill was never seen whole).
            buffered += child.stdout.read()
            for line in buffered.split(b"\n")[:-1]:
                parts = line.split()
                if parts[:1] == [b"SEEN"]:
                    seen.append((parts[1].decode(), int(parts[2]), int(parts[3]), int(parts[4])))
        child.stdout.close()
        child.stderr.close()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        return acked


class KillTests(_Child, SynchronousTestCase):
    """Everything acknowledged as durable before SIGKILL is there after reopening."""

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
        data_dir = self.provisioned()
        first = self.run_and_kill(data_dir, 1500)
        views = self.check(data_dir, first)
        second = self.run_and_kill(data_dir, 700)
        self.check(data_dir, second)
        for name in DEVICES:
            self.assertGreater(second[name][0], views[name].version)


class ResumeAfterKillTests(_Child, TestCase):
    """A dashboard that was told of changes (and their cursors) before a SIGKILL
    resumes from its last cursor after the restart without losing anything."""

    @defer.inlineCallbacks
    def test_resume_from_a_cursor_seen_before_the_kill(self):
        """The dashboard's copy (the changes it saw, the last 200 never durable, then
        what ``changes_since`` of its last cursor gives once the restarted registry
        has made more changes than it saw) equals the registry's state."""
        data_dir = self.provisioned()
        seen = []
        acked = self.run_and_kill(data_dir, 300, seen, stall=600)
        self.assertGreater(seen[-1][2], max(value for _, value in acked.values()))
        copy = {name: counter for name, _, counter, _ in seen}
        cursor = seen[-1][1]
        registry = open_registry(data_dir, clock=reactor)
        self.addCleanup(registry.stop)
        # Changes of one device only, past the dashboard's cursor: the others keep
        # the values the crash rolled back to.
        n = 10 ** 9
        while registry.cursor <= cursor:
            n += 1
            registry.update_reported(DEVICES[0], {"counter": n})
        yield registry.update_reported(DEVICES[0], {"counter": n + 1})
        more = True
        while more:
            batch = registry.changes_since(cursor, limit=2)
            if batch.reset:
                copy = {}
            copy.update((view.name, view.reported["counter"]) for view in batch.devices)
            cursor, more = batch.cursor, batch.more
        self.assertEqual(copy, {name: registry.device(name).reported["counter"]
                                for name in DEVICES})


class VersionAfterKillTests(_Child, TestCase):
    """A device version a dashboard was told before a SIGKILL (its ETag) never names
    another state after the restart."""

    @defer.inlineCallbacks
    def test_version_seen_before_the_kill_is_never_issued_again(self):
        """Versions announced before the kill (the last 200 changes never durable) are
        all below every device's version after the restart, and a write with
        If-Match on the last one seen is refused although the state differs."""
        data_dir = self.provisioned()
        seen = []
        self.run_and_kill(data_dir, 100, seen, stall=200)
        registry = open_registry(data_dir, clock=reactor)
        self.addCleanup(registry.stop)
        for name in DEVICES:
            versions = [version for seen_name, _, _, version in seen if seen_name == name]
            self.assertGreater(registry.device(name).version, max(versions))
        name, _, counter, version = seen[-1]
        self.assertNotEqual(registry.device(name).reported["counter"], counter)
        with self.assertRaises(errors.VersionConflict):
            yield registry.update_desired(name, {"led": "on"}, expected_version=version)
        result = yield registry.update_desired(name, {"led": "on"})
        self.assertGreater(result.version, version)
