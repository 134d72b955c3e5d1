"""A supervisor's reload (workers > 1) that fails for a reason other than a refused
file: logged, and systemd never told "reloaded" (stand-in workers on a Clock,
tests/scale/test_supervision.py)."""

from twisted.trial.unittest import SynchronousTestCase

import broker.workers as workers
from broker.config import load_config
from broker.workers import SupervisorService
from tests.ops.test_systemd import notify_socket
from tests.scale.test_supervision import WorkerClock

CONFIG = ('[registry]\nbackend = "redis"\n[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
          '[ssp]\nport = 0\n[broker]\nworkers = 2\n')


class SupervisorReloadFailureTests(SynchronousTestCase):
    """Every reload outcome reaches systemd as what it was."""

    def setUp(self):
        self.path = self.mktemp()
        with open(self.path, "w") as handle:
            handle.write(CONFIG)
        self.sock, socket_path = notify_socket(self)
        self.clock = WorkerClock()
        self.supervisor = SupervisorService(load_config(self.path), self.path,
                                            reactor=self.clock,
                                            environ={"NOTIFY_SOCKET": socket_path})
        self.supervisor.startService()
        for process in self.supervisor.processes.values():
            process.ready()
        self.addCleanup(self.stop)
        self.assertTrue(self.sock.recv(4096).startswith(b"READY=1\n"))

    def stop(self):
        stopped = self.supervisor.stopService()
        self.clock.advance(self.supervisor.config.broker.stop_timeout + 5.0)
        self.clock.advance(0)
        self.successResultOf(stopped)

    def reload_status(self):
        self.supervisor.reload()
        self.assertTrue(self.sock.recv(4096).startswith(b"RELOADING=1\n"))
        return self.sock.recv(4096)

    def test_a_check_that_raises_is_a_failed_reload(self):
        """load_config raising OverflowError (not ConfigError) is logged with its traceback
        and systemd hears "reload failed", and the running settings stay."""
        def raising(path):
            raise OverflowError("int too large to convert to float")
        self.patch(workers, "load_config", raising)
        before = self.supervisor.config
        self.assertEqual(self.reload_status(),
                         b"READY=1\nSTATUS=2 workers serving (reload failed: see the log)")
        self.assertIs(self.supervisor.config, before)
        self.assertEqual(len(self.flushLoggedErrors(OverflowError)), 1)

    def test_applying_that_raises_is_a_failed_reload(self):
        """A failure while the supervisor takes the new settings is a failed reload too;
        the next good one says reloaded."""
        def raising(running, loaded):
            raise RuntimeError("unforeseen")
        original = workers.reloadable
        self.patch(workers, "reloadable", raising)
        self.assertEqual(self.reload_status(),
                         b"READY=1\nSTATUS=2 workers serving (reload failed: see the log)")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(workers, "reloadable", original)
        self.assertEqual(self.reload_status(), b"READY=1\nSTATUS=2 workers serving (reloaded)")
