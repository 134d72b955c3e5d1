"""The worker supervisor and its real worker processes (python -m broker.workers)."""

from twisted.internet import defer, error, reactor
from twisted.trial.unittest import TestCase

from broker.config import load_config
from broker.workers import SupervisorService

from .redis_support import start_single
from .support import wait_until, write_worker_config


class SupervisionTests(TestCase):
    """A supervisor with one real worker on a real Redis."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        path = write_worker_config(self, start_single(self), workers=1)
        self.supervisor = SupervisorService(load_config(path), path, reactor=reactor)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        yield self.supervisor.ready

    @defer.inlineCallbacks
    def test_a_worker_stops_when_its_supervisor_is_gone(self):
        """A worker whose supervisor died (its end of the worker's stdin pipe closed,
        as on SIGKILL) stops gracefully by itself instead of living on as an orphan
        that keeps its socket of the UDP port's reuseport group."""
        worker = self.supervisor.workers[0]
        self.supervisor.processes[0].closeStdin()
        yield wait_until(self, lambda: worker.ended.called, timeout=20,
                         what="the orphaned worker to exit")
        self.assertIsInstance(worker.reason, error.ProcessDone)

    @defer.inlineCallbacks
    def test_stopping_cancels_a_pending_restart(self):
        """A supervisor stopped while a dead worker waits for its restart spawns no
        worker afterwards and leaves no timer behind."""
        worker = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield worker.ended
        self.assertEqual(len(self.supervisor._restarting), 1)
        yield self.supervisor.stopService()
        self.assertEqual(self.supervisor._restarting, {})
        self.assertIs(self.supervisor.workers[0], worker)

    @defer.inlineCallbacks
    def kill_and_wait_restart(self):
        """SIGKILL worker 0; the delay of its restart, once the new one is ready."""
        worker = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield worker.ended
        delay = self.supervisor._restarting[0].getTime() - reactor.seconds()
        yield wait_until(self, lambda: self.supervisor.workers[0] is not worker
                         and self.supervisor.workers[0].status.get("ready"),
                         what="worker 0 restarted")
        return delay

    @defer.inlineCallbacks
    def test_restart_delay_doubles_and_starts_over_after_a_stable_run(self):
        """A worker that keeps dying is restarted after 0.5 s, then 1 s; one that ran
        for stable_after seconds before dying is restarted after 0.5 s again."""
        first = yield self.kill_and_wait_restart()
        second = yield self.kill_and_wait_restart()
        self.assertEqual(round(first, 1), 0.5)
        self.assertEqual(round(second, 1), 1.0)
        self.supervisor.stable_after = 0.0
        third = yield self.kill_and_wait_restart()
        self.assertEqual(round(third, 1), 0.5)
        self.assertEqual(self.supervisor.restarts, 3)

    @defer.inlineCallbacks
    def test_stop_ends_each_worker_gracefully(self):
        """Stopping the supervisor (its SIGTERM) stops each worker with SIGTERM, and the
        worker exits with status 0 (a graceful stop, not a kill)."""
        worker = self.supervisor.workers[0]
        yield self.supervisor.stopService()
        self.assertTrue(worker.ended.called)
        self.assertIsInstance(worker.reason, error.ProcessDone)
