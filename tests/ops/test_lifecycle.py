"""Graceful stop, reload and signal handling of a BrokerService, in process.

The stop and reload tests run a real broker on loopback (memory registry);
the rules (which settings a reload may change, bounded waits, signals) run
on task.Clock and fakes. tests/ops/test_process.py does the same with real
signals on a twistd subprocess.
"""

import os
import signal
import time
from pathlib import Path

import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet import task
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from broker.config import ConfigError, load_config, replace
from broker.lifecycle import SignalHandlers, reloadable, within
from broker.service import make_service
from tests.helpers import http_json, loopback_config, start_broker
from tests.web.wsclient import connect


class ReloadRulesTests(SynchronousTestCase):
    def test_limits_change_sockets_stay(self):
        """A reload applies limits and the log level; ports, paths and formats keep running values."""
        running = load_config(None)
        loaded = replace(running, "log", level="debug", format="json")
        loaded = replace(loaded, "polling", max_waiters=5)
        loaded = replace(loaded, "http", endpoint="tcp:9999")
        loaded = replace(loaded, "registry", history_size=3)
        config, kept = reloadable(running, loaded)
        self.assertEqual((config.log.level, config.polling.max_waiters), ("debug", 5))
        self.assertEqual(config.log.format, running.log.format)
        self.assertEqual(config.http.endpoint, running.http.endpoint)
        self.assertEqual(config.registry, running.registry)
        self.assertEqual(sorted(kept), ["http.endpoint", "log.format", "registry.history_size"])

    def test_structures_sized_once_need_a_restart(self):
        """[ssp] cipher_cache_size and [websocket] send_buffer_bytes size what is built
        once: a reload keeps them and lists them, instead of ignoring them silently."""
        running = load_config(None)
        loaded = replace(running, "ssp", cipher_cache_size=64)
        loaded = replace(loaded, "websocket", send_buffer_bytes=65536)
        config, kept = reloadable(running, loaded)
        self.assertEqual((config.ssp.cipher_cache_size, config.websocket.send_buffer_bytes),
                         (running.ssp.cipher_cache_size, running.websocket.send_buffer_bytes))
        self.assertEqual(sorted(kept), ["ssp.cipher_cache_size", "websocket.send_buffer_bytes"])

    def test_nothing_changed(self):
        """Reloading the same file changes nothing and warns about nothing."""
        running = load_config(None)
        self.assertEqual(reloadable(running, running), (running, []))


class WithinTests(SynchronousTestCase):
    def test_gives_up_at_the_deadline(self):
        """within() fires after its seconds when the work is not done, and leaves the work alone."""
        clock = Clock()
        work = defer.Deferred()
        bounded = within(work, 2.0, clock, "test")
        clock.advance(1.9)
        self.assertNoResult(bounded)
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(bounded))
        work.callback("late")
        self.assertEqual(self.successResultOf(work), None)

    def test_fires_early_and_swallows_failures(self):
        """within() fires as soon as the work does, and a failure is logged, not passed on."""
        clock = Clock()
        work = defer.Deferred()
        bounded = within(work, 2.0, clock, "test")
        work.errback(ValueError("boom"))
        self.assertIsNone(self.successResultOf(bounded))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class FakeSignals:
    def __init__(self):
        self.handlers = {}

    def signal(self, number, handler):
        previous = self.handlers.get(number)
        self.handlers[number] = handler
        return previous


class ThreadCallReactor(MemoryReactorClock):
    """MemoryReactorClock that queues callFromThread calls for the test to run."""

    def __init__(self):
        super().__init__()
        self.from_thread = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_thread.append((f, args, kwargs))

    def run_thread_calls(self):
        calls, self.from_thread = self.from_thread, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


class FakeBroker:
    def __init__(self):
        self.reactor = ThreadCallReactor()
        self.reloads = 0

    def reload(self):
        self.reloads += 1


class SignalHandlersTests(SynchronousTestCase):
    def test_installed_once_running(self):
        """Handlers go in when the reactor runs (after Twisted's own), not at startService."""
        broker, signals = FakeBroker(), FakeSignals()
        service = SignalHandlers(broker, signals)
        service.startService()
        self.assertEqual(signals.handlers, {})
        broker.reactor.run()
        self.assertEqual(set(signals.handlers), {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    def test_term_stops_reactor_hup_reloads(self):
        """SIGTERM stops the reactor once (no exit signal recorded); SIGHUP calls reload."""
        broker, signals = FakeBroker(), FakeSignals()
        service = SignalHandlers(broker, signals)
        service.startService()
        broker.reactor.run()
        signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(broker.reloads, 0, "reloaded inside the signal handler")
        signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        broker.reactor.run_thread_calls()
        self.assertEqual(broker.reloads, 1)
        self.assertFalse(broker.reactor.running)
        self.assertIsNone(getattr(broker.reactor, "_exitSignal", None))

    def test_hup_after_term_does_not_reload(self):
        """A SIGHUP that arrives once SIGTERM began the stop (drains still running) reloads nothing, so no READY=1 follows STOPPING=1."""
        broker, signals = FakeBroker(), FakeSignals()
        service = SignalHandlers(broker, signals)
        service.startService()
        broker.reactor.run()
        signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        broker.reactor.run_thread_calls()
        signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        broker.reactor.run_thread_calls()
        self.assertEqual(broker.reloads, 0)

    def test_hup_while_the_broker_stops_does_not_reload(self):
        """A SIGHUP during a stop begun elsewhere (twistd, a supervisor) reloads nothing either."""
        broker, signals = FakeBroker(), FakeSignals()
        service = SignalHandlers(broker, signals)
        service.startService()
        broker.reactor.run()
        broker.stopping = True
        signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        broker.reactor.run_thread_calls()
        self.assertEqual(broker.reloads, 0)

    def test_hup_ignored_while_stopping(self):
        """After stop, SIGHUP is ignored instead of killing the process mid-drain."""
        broker, signals = FakeBroker(), FakeSignals()
        service = SignalHandlers(broker, signals)
        service.startService()
        broker.reactor.run()
        service.stopService()
        self.assertIs(signals.handlers[signal.SIGHUP], signal.SIG_IGN)


class GracefulStopTests(TestCase):
    """A running broker stops in the documented order and answers everyone first."""

    timeout = 40

    @defer.inlineCallbacks
    def setUp(self):
        config = loopback_config(self, registry={"backend": "memory"}, ssp={"enabled": False},
                                 broker={"stop_timeout": 5.0})
        self.running = yield start_broker(self, config)
        self.service = self.running.service
        self.registry = self.service.registry
        yield self.registry.add_device("pump-1")
        _, self.token = yield self.registry.add_token("write")

    @defer.inlineCallbacks
    def test_stop_answers_everyone_then_commits(self):
        """On stop: listeners close first, drains run, long polls are answered, idle keep-alives close, the store last."""
        url = self.running.http_url
        seen = []

        def drain():
            seen.append(("drain", self.service.getServiceNamed("http").running,
                         self.service.registry_service.running))
        self.service.drains.append(drain)

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(url + "/healthz", pool=pool)
        yield response.content()
        self.assertEqual(len(self.service.connections), 1, "keep-alive connection not tracked")

        poll = treq.get(f"{url}/api/v1/changes?since={self.registry.cursor}&wait=30",
                        headers={b"authorization": [f"Bearer {self.token}".encode()]},
                        persistent=False)
        yield wait_until(lambda: self.service.api.room and len(self.service.api.room) == 1)

        started = time.monotonic()
        yield self.service.stopService()
        elapsed = time.monotonic() - started

        self.assertEqual(seen, [("drain", False, True)])
        self.assertFalse(self.service.registry_service.running)
        answer = yield poll
        self.assertEqual(answer.code, 200)
        body = yield answer.json()
        self.assertEqual(body["devices"], [])
        self.assertEqual(len(self.service.connections), 0)
        self.assertLess(elapsed, 5.0)
        with self.assertRaises(ConnectionRefusedError):
            yield treq.get(url + "/healthz", persistent=False)

    @defer.inlineCallbacks
    def test_websocket_clients_told_going_away(self):
        """On stop every WebSocket client gets close code 1001 (going away) before the port closes."""
        client = yield connect(self.running.http_url, self.token)
        yield self.service.stopService()
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1001)
        self.assertEqual(len(self.service.connections), 0)

    @defer.inlineCallbacks
    def test_readiness_says_stopping(self):
        """While draining, /readyz (still reachable on a kept connection) says why it is not ready."""
        reasons = []

        def drain():
            reasons.append(self.service.readiness.checks[0]())
        self.service.drains.append(drain)
        self.assertIsNone(self.service.readiness.checks[0]())
        yield self.service.stopService()
        self.assertEqual(reasons, ["stopping"])



class DataDirLockTests(TestCase):
    """One SQLite data directory serves one broker at a time."""

    timeout = 40

    @defer.inlineCallbacks
    def test_second_broker_on_a_running_data_dir_refused(self):
        """A second broker on a running broker's SQLite data_dir refuses to start, naming
        the pid, before it opens the store (which would write restart marks under the
        first): the first's cursors stay valid across its clean restart."""
        config = loopback_config(self, ssp={"enabled": False})
        first = yield start_broker(self, config)
        yield first.service.registry.add_device("porch")
        with self.assertRaises(ConfigError) as caught:
            make_service(config, reactor=reactor)
        message = str(caught.exception)
        self.assertIn(": broker.data_dir: ", message)
        self.assertIn(f"in use by another broker (pid {os.getpid()})", message)
        yield first.service.registry.add_device("shed")
        cursor = first.service.registry.cursor
        yield first.service.stopService()
        again = yield start_broker(self, config)
        self.assertTrue(again.service.running)
        self.assertEqual(again.service.registry.cursor, cursor)     # a clean start: no jump
        self.assertFalse(again.service.registry.changes_since(cursor).reset)


class BoundedStopTests(SynchronousTestCase):
    """The stop deadline, on a memory reactor whose clock the test moves."""

    def test_slow_drain_is_bounded(self):
        """A drain that never finishes holds the stop for stop_timeout seconds, then the store closes."""
        from broker.service import make_service
        config = loopback_config(self, registry={"backend": "memory"}, ssp={"enabled": False},
                                 broker={"stop_timeout": 2.0})
        clock = MemoryReactorClock()
        service = make_service(config, reactor=clock, environ={})
        service.startService()
        never = defer.Deferred()
        service.drains.append(lambda: never)
        stopped = service.stopService()
        clock.advance(1.9)
        self.assertNoResult(stopped)
        self.assertTrue(service.registry_service.running)
        clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertFalse(service.registry_service.running)
        self.assertNoResult(never)
        self.assertEqual(clock.getDelayedCalls(), [])


@defer.inlineCallbacks
def wait_until(condition, timeout=5.0):
    """Poll condition on the real reactor (integration tests only) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, 0.02, lambda: None)


class ReloadTests(TestCase):
    """broker.reload() re-reads the file: what SIGHUP does."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.path = Path(self.mktemp())
        self.data = self.mktemp()
        self.write(level="info", require_token="false")
        from broker.service import make_service
        self.service = make_service(load_config(str(self.path)), reactor,
                                    config_path=str(self.path))
        yield defer.maybeDeferred(self.service.startService)
        self.addCleanup(self.service.stopService)

    def write(self, level, require_token, extra=""):
        self.path.write_text(
            f'[broker]\ndata_dir = "{self.data}"\n'
            f'[registry]\nbackend = "memory"\n[ssp]\nenabled = false\n'
            f'[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
            f'[log]\nlevel = "{level}"\n[metrics]\nrequire_token = {require_token}\n{extra}')

    def sample(self, outcome):
        return self.service.metrics.registry.get_sample_value(
            "broker_config_reloads_total", {"outcome": outcome}) or 0

    @defer.inlineCallbacks
    def test_reload_applies_new_settings(self):
        """Level, token rule and endpoint limits change; reloaders get the new config; nobody restarts."""
        got = []
        self.service.reloaders.append(got.append)
        port = self.service.listening["http"]
        self.write(level="debug", require_token="true", extra="[polling]\nmax_waiters = 7\n")
        yield self.service.reload()
        self.assertEqual(self.service.log_control.level, "debug")
        self.assertTrue(self.service.config.metrics.require_token)
        self.assertEqual([config.polling.max_waiters for config in got], [7])
        self.assertIs(self.service.listening["http"], port)
        self.assertEqual(self.sample("applied"), 1)
        code, _, _ = yield http_json(self, "GET",
                                     f"http://127.0.0.1:{port.getHost().port}/metrics")
        self.assertEqual(code, 401)

    @defer.inlineCallbacks
    def test_a_setting_that_needs_a_restart_is_logged(self):
        """A changed [websocket] send_buffer_bytes keeps the running value in the WebSocket
        factory, and the reload's warning names it as needing a restart."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = self.service.websocket_factory
        running = factory.send_buffer_bytes
        self.write(level="info", require_token="false",
                   extra="[websocket]\nsend_buffer_bytes = 65536\n")
        yield self.service.reload()
        self.assertEqual(factory.send_buffer_bytes, running)
        warned = [event["keys"] for event in events if "need a restart" in
                  (event.get("log_format") or "")]
        self.assertEqual(warned, ["websocket.send_buffer_bytes"])

    @defer.inlineCallbacks
    def test_bad_file_keeps_running_config(self):
        """A reload of a broken file is refused, logged and counted; the running config stays."""
        before = self.service.config
        self.path.write_text("[log]\nlevel = 'loud'\n")
        yield self.service.reload()
        self.assertIs(self.service.config, before)
        self.assertEqual(self.sample("refused"), 1)

    @defer.inlineCallbacks
    def test_systemd_status_tells_a_refused_reload(self):
        """After a refused reload systemd hears READY=1 with a STATUS saying so, not "reloaded"."""
        sent = []
        self.patch(self.service.notifier, "send", lambda *lines: sent.append(lines))
        self.path.write_text("[log]\nlevel = 'loud'\n")
        yield self.service.reload()
        self.assertEqual(sent[-1][0], "READY=1")
        self.assertIn("reload refused", sent[-1][1])
        self.write(level="info", require_token="false")
        yield self.service.reload()
        self.assertEqual(sent[-1], ("READY=1", "STATUS=serving (reloaded)"))

    @defer.inlineCallbacks
    def test_bad_origin_refuses_the_whole_reload(self):
        """A reload whose http.allowed_origins has an entry that is no origin is refused like any bad file: nothing of it applies, counted refused."""
        before = self.service.config
        self.write(level="debug", require_token="false")
        text = self.path.read_text().replace(
            'endpoint = "tcp:0:interface=127.0.0.1"\n',
            'endpoint = "tcp:0:interface=127.0.0.1"\nallowed_origins = ["dash.example.com"]\n')
        self.path.write_text(text)
        yield self.service.reload()
        self.assertIs(self.service.config, before)
        self.assertEqual(self.service.log_control.level, "info")
        self.assertEqual((self.sample("refused"), self.sample("applied")), (1, 0))
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    @defer.inlineCallbacks
    def test_a_reload_that_raises_is_never_reported_as_reloaded(self):
        """A reload whose file check raises something other than ConfigError (a bug) is
        logged with its traceback, counted failed, and systemd hears "reload failed"."""
        import broker.service as module
        sent, events = [], []
        self.patch(self.service.notifier, "send", lambda *lines: sent.append(lines))
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        before = self.service.config

        def raising(path):
            raise OverflowError("int too large to convert to float")
        self.patch(module, "load_config", raising)
        yield self.service.reload()
        self.assertEqual(sent[-1], ("READY=1", "STATUS=serving (reload failed: see the log)"))
        self.assertIs(self.service.config, before)
        self.assertEqual((self.sample("failed"), self.sample("applied")), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors(OverflowError)), 1)
        failed = [event for event in events if "reload failed" in (event.get("log_format") or "")]
        self.assertEqual([event["stage"] for event in failed],
                         ["reading the config file; nothing of it applies"])

    @defer.inlineCallbacks
    def test_a_registry_failing_to_reload_is_a_failed_reload(self):
        """A registry whose reload fails makes the reload failed, logged and counted, not
        "reloaded"; the next good reload is "reloaded" again."""
        sent = []
        self.patch(self.service.notifier, "send", lambda *lines: sent.append(lines))
        registry_reload = self.service.registry.reload
        self.patch(self.service.registry, "reload",
                   lambda: defer.fail(RuntimeError("store unreachable")))
        yield self.service.reload()
        self.assertEqual(sent[-1], ("READY=1", "STATUS=serving (reload failed: see the log)"))
        self.assertEqual(self.sample("failed"), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(self.service.registry, "reload", registry_reload)
        yield self.service.reload()
        self.assertEqual(sent[-1], ("READY=1", "STATUS=serving (reloaded)"))


    @defer.inlineCallbacks
    def test_a_reloader_that_raises_makes_the_reload_failed(self):
        """A reload hook that raises is logged with its traceback, the reload counted
        failed and told "reload failed" (never "configuration reloaded"), while the
        other hooks still get the new config."""
        sent, events, got = [], [], []
        self.patch(self.service.notifier, "send", lambda *lines: sent.append(lines))
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(config):
            raise KeyError("an endpoint's bug")
        self.service.reloaders[:0] = [broken]
        self.service.reloaders.append(got.append)
        self.write(level="debug", require_token="false")
        yield self.service.reload()
        self.assertEqual(sent[-1], ("READY=1", "STATUS=serving (reload failed: see the log)"))
        self.assertEqual((self.sample("failed"), self.sample("applied")), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual([config.log.level for config in got], ["debug"])
        formats = [event.get("log_format") or "" for event in events]
        self.assertFalse([text for text in formats if "configuration reloaded" in text])
        self.assertTrue([text for text in formats if text.startswith("reload failed: ")])

    @defer.inlineCallbacks
    def test_a_failed_reload_applies_nothing_of_the_file(self):
        """A reload whose registry re-read fails keeps the whole running configuration:
        the log level, and [metrics] require_token (loopback scrapes still answered 200)."""
        before = self.service.config
        port = self.service.listening["http"].getHost().port
        self.write(level="debug", require_token="true")
        self.patch(self.service.registry, "reload",
                   lambda: defer.fail(RuntimeError("store unreachable")))
        yield self.service.reload()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIs(self.service.config, before)
        self.assertEqual(self.service.log_control.level, "info")
        code, _, _ = yield http_json(self, "GET", f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_the_reloaded_line_carries_the_new_log_level(self):
        """"configuration reloaded" names the level now in force, in its text and as a
        field the JSON format writes (no field starting "log_", which twisted.logger reserves)."""
        from twisted.logger import formatEvent

        from broker.logs import json_record

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.write(level="warn", require_token="false")
        yield self.service.reload()
        reloaded = [event for event in events
                    if (event.get("log_format") or "").startswith("configuration reloaded")]
        self.assertEqual(len(reloaded), 1)
        self.assertIn("log level warn", formatEvent(reloaded[0]))
        self.assertEqual(json_record(reloaded[0])["level_now"], "warn")


class DataDirectoryTests(SynchronousTestCase):
    """The broker's data directory, made at start."""

    def test_parents_made_for_the_data_directory_are_private(self):
        """Under umask 000 the directories made on the way to data_dir are 0700 too
        (Path.mkdir's mode covers the last one only)."""
        import stat

        from broker.service import ensure_private_directory
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        top = Path(self.mktemp())
        ensure_private_directory(top / "a" / "data")
        for path in (top, top / "a", top / "a" / "data"):
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o700, path)
