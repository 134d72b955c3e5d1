"""The last line of a broker over Redis (a real redis-server on loopback) when it
stops: it claims a committed store only when Redis took every change, names the
devices whose kept writes Redis never took (killed, or refusing writes), and
then sets exit status 1, as with SQLite (tests/ops/test_stop_report.py)."""

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from broker import service as service_module
from broker.registry import errors
from tests.helpers import loopback_config, start_broker
from tests.ops.test_stop_report import StopCapture

from .redis_support import start_server_process


class RedisStopReportTests(StopCapture, TestCase):
    """A broker over Redis stopped on the real reactor, its log lines captured."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        port, self.redis_process = start_server_process(self)
        import redis
        self.direct = redis.Redis(host="127.0.0.1", port=port)
        self.addCleanup(self.direct.close)
        config = loopback_config(self, ssp={"enabled": False}, broker={"stop_timeout": 2.0},
                                 registry={"backend": "redis",
                                           "redis_url": f"redis://127.0.0.1:{port}/0",
                                           "redis_timeout": 1.0})
        self.service = (yield start_broker(self, config)).service
        self.service.exit_on_loss = True           # as under twistd's Application
        self.registry = self.service.registry
        self.capture_stop()
        for name in ("pump-2", "pump-1", "valve"):
            yield self.registry.add_device(name)
        yield self.registry.update_desired("valve", {"open": True})

    def kill_redis(self):
        self.redis_process.kill()
        self.redis_process.wait(10)

    @defer.inlineCallbacks
    def fail_writes(self, *names):
        """Desired writes of ``names`` that Redis does not take (kept to be sent again)."""
        for name in names:
            yield self.assertFailure(self.registry.update_desired(name, {"fan": "on"}),
                                     errors.StoreError)

    @defer.inlineCallbacks
    def test_clean_stop_says_committed(self):
        """A stop after Redis took every change says the store is committed, at info
        level, and leaves the exit status alone."""
        yield self.registry.update_desired("pump-1", {"fan": "on"})
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.info)
        self.assertIn("stopped: store committed and closed after", text)
        self.assertEqual(self.exits, [])

    @defer.inlineCallbacks
    def test_writes_kept_while_redis_is_killed_are_named_not_committed(self):
        """Writes kept after Redis was killed fail their last try at the stop: the last
        line is an error naming those devices (not the one Redis took) and Redis's
        error, never claims a committed store nor an unclean next start (Redis has no
        such mark), and sets exit status 1."""
        self.kill_redis()
        yield self.fail_writes("pump-2", "pump-1")
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.error)
        self.assertNotIn("committed", text)
        self.assertIn("the changes of 2 device(s) could not be stored (Redis", text)
        self.assertIn("lost: pump-1, pump-2", text)
        self.assertNotIn("unclean", text)
        self.assertEqual(self.exits, [service_module.UNSTORED])

    @defer.inlineCallbacks
    def test_writes_redis_refuses_are_named_with_its_answer(self):
        """Writes Redis refuses (too few replicas) are kept and refused again at the
        stop, although Redis still answers reads: the last line names the device and
        Redis's refusal, and the exit status is 1."""
        self.direct.config_set("min-replicas-to-write", 1)
        yield self.fail_writes("pump-1")
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.error)
        self.assertNotIn("committed", text)
        self.assertIn("NOREPLICAS", text)
        self.assertIn("lost: pump-1", text)
        self.assertEqual(self.exits, [service_module.UNSTORED])

    @defer.inlineCallbacks
    def test_redis_gone_with_nothing_waiting_is_not_called_committed(self):
        """Redis killed when no change waits for it: the last line is a warning saying
        the store holds every change it acknowledged but its last call failed, not
        "committed", and the exit status is left alone (nothing was lost)."""
        self.kill_redis()
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.warn)
        self.assertNotIn("committed", text)
        self.assertIn("holds every change it acknowledged", text)
        self.assertIn("its last call failed (Redis", text)
        self.assertEqual(self.exits, [])
