"""With [broker] workers, a stop that loses changes exits 1, as a single process does.

systemd watches the supervisor, not the workers: a worker whose stop lost
changes exits 1 (it has no Application parent to set that for it), and the
supervisor, while stopping, logs a worker's non-zero exit at error level and
exits with that status. On a Clock with stand-in processes first, then a
real `twistd broker` with two workers on a real Redis refusing writes.
"""

import os

from twisted.application.service import Application
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker import workers
from broker.workers import STOP_KILLED, SupervisorService
from tests.ops.test_process import request, start as start_twistd
from tests.scale.support import SingleRedis, open_registry_on, wait_until
from tests.scale.test_supervision import WorkerClock, logged, worker_settings


class SupervisorStopStatusTests(SynchronousTestCase):
    """The supervisor's exit status after its workers' stops, on a Clock."""

    def setUp(self):
        self.statuses = []
        self.patch(workers, "exit_with_status_at_exit", self.statuses.append)
        self.clock = WorkerClock()
        self.supervisor = SupervisorService(worker_settings(), None, reactor=self.clock,
                                            environ={})
        self.supervisor.startService()

    def under_twistd(self):
        self.supervisor.setServiceParent(Application("broker"))

    def stop(self, **ends):
        """Stop the supervisor; worker i ends as ``ends["w<i>"]`` (exit code, or
        ("signal", number)) instead of exiting 0 on its SIGTERM."""
        stopping = self.supervisor.stopService()
        for index, process in self.supervisor.processes.items():
            end = ends.get(f"w{index}")
            if isinstance(end, tuple):
                process.exit(number=end[1])
            elif end is not None:
                process.exit(end)
        self.clock.advance(0)
        self.successResultOf(stopping)

    def test_a_worker_that_lost_changes_makes_the_broker_exit_with_its_status(self):
        """Under twistd, a worker exiting 1 during the stop (it lost changes) is logged at
        error level naming it and its status, and the broker's exit status becomes 1;
        before, the line was at info level and the broker exited 0."""
        errors = logged(self, LogLevel.error)
        self.under_twistd()
        self.stop(w1=1)
        self.assertEqual(self.statuses, [1])
        self.assertEqual(self.supervisor.stop_status, 1)
        [line] = [formatEvent(event) for event in errors]
        self.assertTrue(line.startswith("worker 1 stopped (exit status 1): its stop failed"),
                        line)
        self.assertIn("the broker exits with status 1", line)

    def test_the_first_failed_status_is_kept(self):
        """Two workers failing their stops: the broker exits with the first one's status,
        set once."""
        self.under_twistd()
        self.stop(w0=2, w1=1)
        self.assertEqual(self.statuses, [2])

    def test_a_worker_killed_during_the_stop_fails_it(self):
        """A worker killed during the stop (SIGKILL after the timeout, or a crash) may have
        lost changes: the broker exits with status 1."""
        self.under_twistd()
        self.stop(w0=("signal", 9))
        self.assertEqual(self.statuses, [STOP_KILLED])

    def test_a_clean_stop_leaves_the_exit_status_alone(self):
        """Workers exiting 0, or killed by SIGTERM before their handlers were installed
        (still starting, nothing served), leave the exit status alone, logged at info."""
        infos = logged(self, LogLevel.info)
        errors = logged(self, LogLevel.error)
        self.under_twistd()
        self.stop(w1=("signal", 15))
        self.assertEqual((self.statuses, self.supervisor.stop_status), ([], None))
        self.assertEqual(errors, [])
        self.assertIn("worker 1 stopped (killed by signal 15 (SIGTERM))",
                      [formatEvent(event) for event in infos])

    def test_without_twistd_the_status_is_only_recorded(self):
        """Outside twistd (no Application parent: tests), a failed worker stop is recorded
        in stop_status but sets no process exit status."""
        self.stop(w0=1)
        self.assertEqual((self.statuses, self.supervisor.stop_status), ([], 1))

    def test_after_giving_up_the_exit_status_stays_gave_up(self):
        """A worker failing its stop after the supervisor gave up does not add a second
        exit status: the broker exits with GAVE_UP alone."""
        self.under_twistd()
        self.supervisor.failure_limit = 1
        self.supervisor.processes[0].exit(2)
        self.assertTrue(self.clock.stopped)
        self.stop(w1=3)
        self.assertEqual(self.statuses, [workers.GAVE_UP])


class TwistdWorkersLossTests(SingleRedis, TestCase):
    """A real `twistd broker` with two workers on a Redis that refuses writes."""

    timeout = 150

    def write_config(self, url):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "broker.toml")
        with open(path, "w") as handle:
            handle.write(f"""
[broker]
data_dir = "{os.path.join(directory, 'data')}"
workers = 2
stop_timeout = 2.0
[log]
format = "json"
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
enabled = false
[registry]
backend = "redis"
redis_url = "{url}"
redis_timeout = 1.0
""")
        return path

    @defer.inlineCallbacks
    def test_a_stop_that_loses_changes_exits_1(self):
        """A desired write Redis refuses (kept, refused again at the stop) is named lost
        by the worker that took it, which exits 1; the supervisor logs that at error
        level and the broker exits 1, as docs/operations.md "Stopping" says (before: 0)."""
        import redis
        url = self.start_redis()
        direct = redis.Redis.from_url(url)
        self.addCleanup(direct.close)
        registry = open_registry_on(self, url)
        yield registry.add_device("valve")
        _, token = yield registry.add_token("write")
        broker = start_twistd(self, self.write_config(url))

        def ready():
            return [r for r in broker.records
                    if str(r.get("message", "")).startswith("broker ready")]
        yield wait_until(self, lambda: len(ready()) == 2 or broker.ended.called, timeout=90,
                         what="both workers ready")
        self.assertEqual(len(ready()), 2, broker.output.decode(errors="replace")[-3000:])
        base = "http://" + ready()[0]["http"]
        direct.config_set("min-replicas-to-write", 1)
        code, body = yield request("PATCH", base + "/api/v1/devices/valve/desired", token,
                                   body={"open": True})
        self.assertEqual(code, 503, body)
        broker.signal("TERM")
        exit_code, killed_by = yield broker.ended.addTimeout(90, reactor)
        output = broker.output.decode(errors="replace")[-4000:]
        self.assertEqual((exit_code, killed_by), (1, None), output)
        lost = [r for r in broker.records if r.get("namespace") == "broker.service"
                and r.get("level") == "error" and "are lost" in str(r.get("message"))]
        self.assertEqual(len(lost), 1, output)
        self.assertIn("valve", lost[0]["message"])
        stopped = [r for r in broker.records if r.get("namespace") == "broker.workers"
                   and str(r.get("message", "")).startswith(f"worker {lost[0]['worker']} "
                                                            "stopped (exit status 1)")]
        self.assertEqual([r.get("level") for r in stopped], ["error"], output)

