"""A SharedRegistry when Redis misbehaves (real redis-server on loopback): a
connection dropped mid-command, a server that stops answering, connections
killed, change-stream entries trimmed before a cut-off process read them,
a reactor too busy to take what the stream reader read, and Redis that
lost data (FLUSHALL, restarted from an older snapshot)."""

import os
import signal
import subprocess
import time

import cbor2
import redis
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from broker.registry import SessionRecord, errors
from broker.registry.database import decode_state
from broker.registry.redis_admin import RedisAdmin
from broker.registry.redis_connection import RedisOptions
from broker.registry.redis_follow import MAX_BATCHES_WAITING
from broker.registry.settings import RegistrySettings
from broker.registry.shared_retry import RETRY_DELAY, RETRY_DELAY_MAX
from broker.registry.shared import open_shared_registry

from .redis_support import CuttingProxy, start_server_process
from .support import capture_critical, wait_until

#: how a change script's reply starts on the wire: ``{'ok', first, version}``.
OK_REPLY = b"$2\r\nok\r\n"


class RedisFailureTests(TestCase):
    """Writes whose outcome Redis did not confirm fail, none is run twice, and
    every process's replica ends up as Redis holds the registry."""

    timeout = 60

    def setUp(self):
        self.redis_port, self.redis_process = start_server_process(self)
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis_port)
        self.addCleanup(self.direct.close)

    def open_registry(self, port, start=True, **options):
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{port}/0", **options),
            reactor=reactor, lease_ttl=0)
        if start:
            registry.start()
        self.addCleanup(registry.stop)
        return registry

    @defer.inlineCallbacks
    def report_whose_reply_is_lost(self, name):
        """A device added by another process, a registry behind a CuttingProxy (not
        following the stream yet), and a report {"a": 1} with event "boot" whose
        reply was lost after Redis ran it. Returns (admin, proxy, registry, number)."""
        admin = RedisAdmin.open(RedisOptions(url=f"redis://127.0.0.1:{self.redis_port}/0"))
        self.addCleanup(admin.close)
        admin.add_device(name)
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port, start=False)
        number = registry.device(name).device_number
        proxy.cut_reply(OK_REPLY)
        yield self.assertFailure(registry.update_reported(name, {"a": 1}, events=["boot"]),
                                 errors.StoreError)
        return admin, proxy, registry, number

    def stored(self, number):
        """The device's reported map and the events of its history, as Redis holds them."""
        state = decode_state(self.direct.hget(f"{{ssp}}:d:{number}", "s"))
        events = []
        for _, _, _, kind, data in state[11]:
            if kind == "events":
                events.extend(data)
            elif kind == "reported" and "events" in data:
                events.extend(data["events"])
        return dict(zip(state[0], state[1])), events

    def state_entries(self, number):
        return [fields for _, fields in self.direct.xrange("{ssp}:feed")
                if fields[b"t"] == b"s" and int(fields[b"n"]) == number]

    @defer.inlineCallbacks
    def test_connection_lost_after_a_change_fails_it_and_never_runs_it_twice(self):
        """A connection lost after Redis ran a change script, before its reply arrived,
        fails the write with StoreError and leaves exactly one change in Redis (a
        client that re-sent it would get "stale" and apply the events a second time)."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        provisioned = yield registry.add_device("dev-1")
        number = provisioned.device_number
        proxy.cut_reply(OK_REPLY)
        d = registry.update_reported("dev-1", {"t": 1}, events=["boot"])
        yield self.assertFailure(d, errors.StoreError)
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(int(self.direct.hget(f"{{ssp}}:d:{number}", "v")), 2)
        self.assertEqual(len(self.state_entries(number)), 1)
        # The change Redis did make reaches the replica on the stream.
        yield wait_until(self, lambda: registry.device("dev-1").version == 2,
                         what="the change on the stream")
        self.assertEqual(dict(registry.device("dev-1").reported), {"t": 1})
        # And the registry writes again once the connection is back.
        result = yield registry.update_reported("dev-1", {"t": 2})
        self.assertEqual(result.version, 3)

    @defer.inlineCallbacks
    def test_a_report_whose_reply_was_lost_is_not_applied_again(self):
        """A report Redis applied whose reply was lost fails, is sent again before the
        device's next report (built on it, as the endpoint builds it), and when Redis
        answers "stale" the stream shows it was this process's: its events are in the
        device's history once, the next report's after them."""
        # Not following the stream yet: the retry reaches Redis before this
        # process learns that the lost call was applied.
        admin, proxy, registry, number = yield self.report_whose_reply_is_lost("dev-a")
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(self.stored(number), ({"a": 1}, ["boot"]))
        later = registry.update_reported("dev-a", {"b": 2}, events=["tick"])
        yield wait_until(self, lambda: registry.counters["retried_stale"] == 1,
                         what="the retry answered stale")
        registry.start()
        result = yield later
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["boot", "tick"]))
        self.assertEqual(registry.counters["retry_already_applied"], 1)
        self.assertEqual((result.version, len(self.state_entries(number))), (3, 2))
        self.assertEqual(dict(registry.device("dev-a").reported), {"a": 1, "b": 2})

    @defer.inlineCallbacks
    def test_a_lost_reply_whose_stream_entry_was_trimmed_is_judged_by_the_history(self):
        """A report Redis applied whose reply was lost, and whose stream entry was trimmed
        before this process read it, is recognised as applied from the device's history
        after the catch-up: its events are stored once, the next report's after them."""
        admin, proxy, registry, number = yield self.report_whose_reply_is_lost("dev-h")
        self.direct.xtrim("{ssp}:feed", maxlen=0)
        admin.add_device("dev-later")       # the entry after the gap
        registry.start()
        yield wait_until(self, lambda: registry.counters["stream_resync"] == 1,
                         what="the catch-up")
        result = yield registry.update_reported("dev-h", {"b": 2}, events=["tick"])
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["boot", "tick"]))
        self.assertEqual((registry.counters["retry_already_applied"],
                          registry.counters["retry_outcome_unknown"]), (1, 0))
        self.assertEqual(result.version, 3)

    @defer.inlineCallbacks
    def test_a_report_lost_before_redis_got_it_is_written_before_the_next(self):
        """A report whose script never reached Redis (connection dropped on the way)
        fails, and is written before the device's next report, which is built on it
        (as the endpoint builds it) and acknowledged: none of its events is lost."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-b")).device_number
        proxy.cut_request(b"lost-event")
        yield self.assertFailure(
            registry.update_reported("dev-b", {"a": 1}, events=["lost-event"]),
            errors.StoreError)
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(self.stored(number), ({}, []))
        result = yield registry.update_reported("dev-b", {"b": 2}, events=["tick"])
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["lost-event", "tick"]))
        self.assertEqual(result.version, 3)
        self.assertEqual(dict(registry.device("dev-b").reported), {"a": 1, "b": 2})

    @defer.inlineCallbacks
    def test_a_report_refused_in_a_failed_call_gets_its_refusal(self):
        """A report the registry refuses (state_too_large) queued with one whose call
        fails is answered with its refusal, not not_durable ("applied, do not send
        again"), and is never sent: the kept report lands, the refused one does not."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{proxy.port}/0"), reactor=reactor,
            lease_ttl=0, settings=RegistrySettings(max_state_bytes=1024))
        registry.start()
        self.addCleanup(registry.stop)
        number = (yield registry.add_device("dev-r")).device_number
        proxy.cut_request(b"marker-cut")
        first = registry.update_reported("dev-r", {"a": "x" * 600}, events=["marker-cut"])
        second = registry.update_reported("dev-r", {"b": "y" * 600}, token=7)
        yield self.assertFailure(first, errors.NotDurable)
        error = yield self.assertFailure(second, errors.RegistryError)
        self.assertEqual((type(error), error.token), (errors.StateTooLarge, 7))
        yield wait_until(self, lambda: registry.device("dev-r").version == 2, timeout=10,
                         what="the kept report landed")
        self.assertEqual(self.stored(number), ({"a": "x" * 600}, ["marker-cut"]))

    @defer.inlineCallbacks
    def test_a_kept_report_fails_as_not_durable_and_lands_once(self):
        """A report whose call failed and that is kept to be sent again fails as
        NotDurable, not as a plain store error (its writer must not send it again: an
        HTTP client gets 503 not_durable), and its events land once, by the retry."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-k")).device_number
        proxy.cut_request(b"kept-event")
        failure = yield self.assertFailure(
            registry.update_reported("dev-k", {"a": 1}, events=["kept-event"], token=7),
            errors.NotDurable)
        self.assertEqual((failure.code, failure.token), ("not_durable", 7))
        yield wait_until(self, lambda: self.stored(number)[1] == ["kept-event"], timeout=10,
                         what="the kept report written again")
        self.assertEqual(self.stored(number), ({"a": 1}, ["kept-event"]))

    @defer.inlineCallbacks
    def test_writes_behind_a_report_failing_again_fail_too_and_are_kept(self):
        """When a kept report fails again, the device's write waiting behind it fails
        at once too (no waiting for Redis to be back), and both are written later,
        in order, each once."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-d")).device_number
        proxy.cut_request(b"lost-event")
        yield self.assertFailure(
            registry.update_reported("dev-d", {"a": 1}, events=["lost-event"]),
            errors.StoreError)
        proxy.cut_request(b"lost-event")
        yield self.assertFailure(registry.update_reported("dev-d", {"b": 2}, events=["tick"]),
                                 errors.StoreError)
        self.assertEqual(proxy.cuts, 2)
        yield wait_until(self, lambda: len(self.stored(number)[1]) == 2, timeout=10,
                         what="both written again")
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["lost-event", "tick"]))
        self.assertEqual(len(self.state_entries(number)), 2)

    @defer.inlineCallbacks
    def test_writes_kept_behind_a_report_failing_again_fail_as_not_durable(self):
        """The writes failed behind a kept report whose retry failed again are told
        NotDurable when they are kept (sending them again would land them twice), and
        plain StoreError when they are not (an expected version: never sent, dropped)."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-e")).device_number
        proxy.cut_request(b"lost-event")
        yield self.assertFailure(
            registry.update_reported("dev-e", {"a": 1}, events=["lost-event"]),
            errors.NotDurable)
        proxy.cut_request(b"lost-event")
        behind = registry.update_reported("dev-e", {"b": 2}, events=["tick"], token=8)
        checked = registry.update_desired("dev-e", {"mode": "eco"}, expected_version=1)
        kept = yield self.assertFailure(behind, errors.StoreError)
        dropped = yield self.assertFailure(checked, errors.StoreError)
        self.assertEqual((type(kept), kept.token), (errors.NotDurable, 8))
        self.assertEqual(type(dropped), errors.StoreError)
        yield wait_until(self, lambda: len(self.stored(number)[1]) == 2, timeout=10,
                         what="both reports written again")
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["lost-event", "tick"]))
        self.assertEqual(len(self.state_entries(number)), 2)
        yield wait_until(self, lambda: registry.device("dev-e").version == 3,
                         what="the replica")
        self.assertEqual(dict(registry.device("dev-e").desired), {})

    @defer.inlineCallbacks
    def test_a_report_the_stream_showed_applied_before_its_call_failed_is_not_durable(self):
        """A report Redis ran whose connection dropped before the reply, and whose change
        the stream brought before the failure, fails as NotDurable (applied: do not send
        it again), not as a store error that asks for it again; it lands once."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-s")).device_number
        store, write = registry._store, registry._store.write

        def after_the_stream(failure):
            # The failure reaches the registry after the stream's entry, as when the
            # stream is quicker than the writer's reconnection.
            waited = wait_until(self, lambda: registry.device("dev-s").version == 2,
                                what="the change on the stream")
            return waited.addCallback(lambda _: failure)

        store.write = lambda *args: write(*args).addErrback(after_the_stream)
        self.addCleanup(setattr, store, "write", write)
        proxy.cut_reply(OK_REPLY)
        failure = yield self.assertFailure(
            registry.update_reported("dev-s", {"a": 1}, events=["once"], token=9),
            errors.StoreError)
        self.assertEqual((type(failure), failure.token), (errors.NotDurable, 9))
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(registry.counters["retry_already_applied"], 1)
        result = yield registry.update_reported("dev-s", {"b": 2})
        self.assertEqual(result.version, 3)
        self.assertEqual(self.stored(number), ({"a": 1, "b": 2}, ["once"]))

    @defer.inlineCallbacks
    def test_changes_too_few_replicas_acknowledged_fail_as_not_durable_once_applied(self):
        """With redis_wait_replicas and no replica, a report and a desired patch with an
        expected version that Redis ran fail as NotDurable (applied, on the stream and
        in this replica by then; do not send again), each stored once; a version check
        that changes nothing succeeds."""
        admin = RedisAdmin.open(RedisOptions(url=f"redis://127.0.0.1:{self.redis_port}/0"))
        self.addCleanup(admin.close)
        admin.add_device("dev-w")
        registry = self.open_registry(self.redis_port, wait_replicas=1, wait_timeout=0.1)
        number = registry.device("dev-w").device_number
        report = yield self.assertFailure(
            registry.update_reported("dev-w", {"a": 1}, events=["press"], token=3),
            errors.StoreError)
        self.assertEqual((type(report), report.token), (errors.NotDurable, 3))
        self.assertEqual(registry.device("dev-w").version, 2)      # the replica has it
        desired = yield self.assertFailure(
            registry.update_desired("dev-w", {"mode": "eco"}, expected_version=2),
            errors.StoreError)
        self.assertEqual(type(desired), errors.NotDurable)
        self.assertEqual(dict(registry.device("dev-w").desired), {"mode": "eco"})
        checked = yield registry.update_desired("dev-w", {}, expected_version=3)
        self.assertEqual(checked.version, 3)
        self.assertEqual(self.stored(number), ({"a": 1}, ["press"]))
        self.assertEqual(len(self.state_entries(number)), 2)

    @defer.inlineCallbacks
    def test_a_desired_patch_with_an_expected_version_in_doubt_fails_as_outcome_unknown(self):
        """A desired patch with an expected version whose call failed with its outcome
        unknown (it is not sent again: the version is its writer's to check) fails as
        OutcomeUnknown: neither "applied" nor "nothing applied, send it again"."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        yield registry.add_device("dev-u")
        proxy.cut_request(b"in-doubt")
        failure = yield self.assertFailure(
            registry.update_desired("dev-u", {"mode": "in-doubt"}, expected_version=1,
                                    token=5),
            errors.StoreError)
        self.assertEqual((type(failure), failure.code, failure.token),
                         (errors.OutcomeUnknown, "outcome_unknown", 5))
        self.assertEqual(proxy.cuts, 1)
        result = yield registry.update_desired("dev-u", {"mode": "eco"}, expected_version=1)
        self.assertEqual(result.version, 2)     # it was not applied (nor sent again)

    @defer.inlineCallbacks
    def test_a_lost_report_is_written_on_its_own_when_the_device_says_nothing_more(self):
        """A report whose script never reached Redis is sent again after a short delay
        even if the device writes nothing more, exactly once."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        number = (yield registry.add_device("dev-c")).device_number
        proxy.cut_request(b"lost-event")
        yield self.assertFailure(
            registry.update_reported("dev-c", {"a": 1}, events=["lost-event"]),
            errors.StoreError)
        yield wait_until(self, lambda: self.stored(number)[1], timeout=10,
                         what="the report written again")
        yield wait_until(self, lambda: registry.device("dev-c").version == 2,
                         what="the replica")
        self.assertEqual(self.stored(number), ({"a": 1}, ["lost-event"]))
        self.assertEqual(len(self.state_entries(number)), 1)

    @defer.inlineCallbacks
    def registry_on_a_clock(self):
        """A started registry behind a CuttingProxy whose timers (end-of-turn flush,
        retry rounds) run on a task.Clock; one device added. Returns (proxy, clock,
        registry, device number, rounds_armed): the delay of the retry round armed
        now, or False."""
        proxy = CuttingProxy(self, self.redis_port)
        clock = task.Clock()
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5),
            reactor=reactor, clock=clock, lease_ttl=0, settings=RegistrySettings(
                reload_interval=0))
        registry.start()
        self.addCleanup(registry.stop)
        added = registry.add_device("dev-b")
        clock.advance(0)
        number = (yield added).device_number

        def rounds_armed():
            clock.advance(0)     # the registry's end-of-turn flush runs on this clock
            call = registry._retry_call
            return call and call.active() and round(call.getTime() - clock.seconds(), 3)
        return proxy, clock, registry, number, rounds_armed

    @defer.inlineCallbacks
    def test_retry_rounds_back_off_while_redis_is_away_and_start_over_once_it_answers(self):
        """While Redis stays away, each round of sending kept writes again waits twice as
        long as the last (up to RETRY_DELAY_MAX), so an outage costs a device a few calls,
        not one a second; once Redis answers, the kept write lands and rounds start over."""
        proxy, clock, registry, number, rounds_armed = yield self.registry_on_a_clock()
        proxy.hold()             # a partition: every call times out
        failed = registry.update_reported("dev-b", {"t": 1}, events=["held"])
        clock.advance(0)
        yield self.assertFailure(failed, errors.StoreError)
        delays = []
        for _ in range(6):
            yield wait_until(self, rounds_armed, timeout=10, what="a retry round armed")
            delays.append(rounds_armed())
            clock.advance(delays[-1])
        self.assertEqual(delays, [RETRY_DELAY * 2 ** i for i in range(5)] + [RETRY_DELAY_MAX])
        proxy.release()          # the last round's call, held until now, goes through
        yield wait_until(self, lambda: (clock.advance(0), self.stored(number)[1])[1],
                         timeout=10, what="the kept report written")
        self.assertEqual(self.stored(number), ({"t": 1}, ["held"]))
        # (Redis has the write a moment before its answer reaches the reactor.)
        yield wait_until(self, lambda: registry._retry_delay == RETRY_DELAY, timeout=10,
                         what="retry rounds starting over")

    @defer.inlineCallbacks
    def test_reports_through_an_outage_are_kept_as_one_write_and_all_land(self):
        """Reports a device makes while Redis is away are kept as one write behind the
        report in doubt (patches composed, events joined in order, the newest session
        record), not one each; once Redis is back the device holds every value and
        event once."""
        proxy, clock, registry, number, rounds_armed = yield self.registry_on_a_clock()
        proxy.hold()
        first = registry.update_reported("dev-b", {"t": 0, "m": {"a": 1}}, events=["e0"])
        clock.advance(0)
        yield self.assertFailure(first, errors.StoreError)
        later = []
        for i in range(1, 21):
            later.append(registry.update_reported(
                "dev-b", {"t": i, "m": {"b": i}}, events=[f"e{i}"]))
            later.append(registry.save_session(number, SessionRecord(7, i, b"", 0, b"", 0, 0)))
        yield wait_until(self, rounds_armed, timeout=10, what="a retry round armed")
        clock.advance(rounds_armed())            # the report in doubt goes alone, and fails
        yield wait_until(self, lambda: rounds_armed() == 2 * RETRY_DELAY, timeout=10,
                         what="the second round armed")
        for d in later:
            yield self.assertFailure(d, errors.StoreError)
        self.assertLessEqual(len(registry._queues[number]), 3)
        proxy.release()
        clock.advance(rounds_armed())
        yield wait_until(self, lambda: (clock.advance(0), len(self.stored(number)[1]))[1] == 21,
                         timeout=10, what="every event written")
        self.assertEqual(self.stored(number),
                         ({"t": 20, "m": {"a": 1, "b": 20}}, [f"e{i}" for i in range(21)]))
        record = registry.session_record(number)
        self.assertEqual((record.session_id, record.acked_remote_num), (7, 20))

    def presence(self, number):
        """(online, holder) of the device as Redis holds them (holder None: nobody)."""
        state = decode_state(self.direct.hget(f"{{ssp}}:d:{number}", "s"))
        holder = self.direct.hget(f"{{ssp}}:d:{number}", "h")
        return state[6], holder.decode() if holder else None

    @defer.inlineCallbacks
    def outcome(self, clock, d, timeout=10):
        """``d``'s result or Failure (in a 1-tuple), the clock's end-of-turn calls
        run meanwhile (a write queued behind a call in flight is sent on that clock)."""
        got = []
        d.addBoth(got.append)
        yield wait_until(self, lambda: (clock.advance(0), got)[1], timeout=timeout,
                         what="the write answered")
        return got[0],

    @defer.inlineCallbacks
    def rounds(self, clock, registry, number, count):
        """Run ``count`` retry rounds (the longest delay each), each until the
        device has no call in flight nor change waiting for the stream."""
        for _ in range(count):
            clock.advance(RETRY_DELAY_MAX)
            yield wait_until(self, lambda: (clock.advance(0), number not in registry._busy)[1],
                             timeout=10, what="no call in flight")

    @defer.inlineCallbacks
    def online_on_a_clock(self):
        """registry_on_a_clock with its device claimed online by the registry;
        returns the same five values."""
        proxy, clock, registry, number, rounds_armed = yield self.registry_on_a_clock()
        claimed, = yield self.outcome(clock, registry.set_connection("dev-b", online=True))
        self.assertEqual(claimed.name, "dev-b")
        self.assertEqual(self.presence(number), (True, registry.origin))
        return proxy, clock, registry, number, rounds_armed

    @defer.inlineCallbacks
    def test_an_offline_write_that_failed_is_sent_again_until_it_lands(self):
        """A device's offline write that never reached Redis fails, is counted and kept,
        and the registry's retry round (not a timer of the device) sends it again: Redis
        then shows the device offline and held by nobody, and nothing stays queued."""
        proxy, clock, registry, number, rounds_armed = yield self.online_on_a_clock()
        proxy.cut_request(b"~" + registry.origin.encode())
        gone, = yield self.outcome(clock, registry.set_connection("dev-b", online=False))
        self.assertIsInstance(gone.value, errors.StoreError)
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(registry.counters["presence_offline_retried"], 1)
        self.assertEqual(self.presence(number), (True, registry.origin))
        yield wait_until(self, rounds_armed, timeout=5, what="a retry round armed")
        self.assertEqual(rounds_armed(), RETRY_DELAY)
        clock.advance(RETRY_DELAY)
        yield wait_until(self, lambda: (clock.advance(0), self.presence(number))[1]
                         == (False, None), timeout=5, what="the offline write landing")
        yield wait_until(self, lambda: not registry.device("dev-b").online, timeout=5,
                         what="the replica showing it offline")
        self.assertNotIn(number, registry._queues)
        self.assertEqual(self.direct.smembers(f"{{ssp}}:held:{registry.origin}"), set())

    @defer.inlineCallbacks
    def test_offline_retries_back_off_while_redis_stays_away(self):
        """An offline write kept through an outage is tried once per retry round, the
        rounds waiting twice as long each time, and lands once Redis answers again."""
        proxy, clock, registry, number, rounds_armed = yield self.online_on_a_clock()
        proxy.hold()
        gone, = yield self.outcome(clock, registry.set_connection("dev-b", online=False))
        self.assertIsInstance(gone.value, errors.StoreError)
        delays = []
        for _ in range(3):
            yield wait_until(self, rounds_armed, timeout=10, what="a retry round armed")
            delays.append(rounds_armed())
            clock.advance(delays[-1])
        self.assertEqual(delays, [RETRY_DELAY, 2 * RETRY_DELAY, 4 * RETRY_DELAY])
        self.assertGreaterEqual(registry.counters["presence_offline_retried"], 3)
        proxy.release()
        yield wait_until(self, lambda: (clock.advance(0), self.presence(number))[1]
                         == (False, None), timeout=10, what="the offline write landing")

    @defer.inlineCallbacks
    def test_a_device_back_online_before_the_retry_stays_online(self):
        """A device back online before its failed offline write (in doubt: Redis may
        have run it) is sent again ends online: the claim is queued behind it, so
        later retry rounds never mark it offline."""
        proxy, clock, registry, number, rounds_armed = yield self.online_on_a_clock()
        proxy.cut_request(b"~" + registry.origin.encode())
        gone, = yield self.outcome(clock, registry.set_connection("dev-b", online=False))
        self.assertIsInstance(gone.value, errors.StoreError)
        back, = yield self.outcome(clock, registry.set_connection("dev-b", online=True))
        self.assertEqual(back.name, "dev-b")
        yield self.rounds(clock, registry, number, 3)
        self.assertEqual(self.presence(number), (True, registry.origin))
        self.assertTrue(registry.device("dev-b").online)
        self.assertNotIn(number, registry._queues)

    @defer.inlineCallbacks
    def test_connection_writes_through_an_outage_are_superseded_not_piled_up(self):
        """A device flapping (and refreshing its facts) while Redis is away keeps a few
        connection writes, not one per change: a kept one not in doubt is dropped,
        counted, when a newer one comes; once Redis is back the newest holds."""
        proxy, clock, registry, number, rounds_armed = yield self.online_on_a_clock()
        proxy.hold()
        gone, = yield self.outcome(clock, registry.set_connection("dev-b", online=False))
        self.assertIsInstance(gone.value, errors.StoreError)
        for i in range(12):
            # (each answered at once: failing behind the write in doubt)
            yield self.outcome(clock, registry.set_connection("dev-b", online=i % 3 != 2))
        self.assertLessEqual(len(registry._queues[number]), 3)
        self.assertGreaterEqual(registry.counters["presence_write_superseded"], 10)
        yield self.outcome(clock, registry.set_connection("dev-b", online=True))
        proxy.release()
        yield self.rounds(clock, registry, number, 4)
        self.assertEqual(self.presence(number), (True, registry.origin))
        yield wait_until(self, lambda: not registry._queues, timeout=5, what="nothing queued")

    @defer.inlineCallbacks
    def test_an_offline_write_redis_ran_whose_reply_was_lost_never_lands_after_a_return(self):
        """An offline write Redis ran but whose reply was lost is in doubt; the device
        coming back online meanwhile is written after it, so the device ends online."""
        proxy, clock, registry, number, rounds_armed = yield self.online_on_a_clock()
        proxy.cut_reply(OK_REPLY)
        gone, = yield self.outcome(clock, registry.set_connection("dev-b", online=False))
        self.assertIsInstance(gone.value, errors.StoreError)
        self.assertEqual(self.presence(number), (False, None))
        back, = yield self.outcome(clock, registry.set_connection("dev-b", online=True))
        self.assertEqual(back.name, "dev-b")
        yield self.rounds(clock, registry, number, 3)
        self.assertEqual(self.presence(number), (True, registry.origin))
        yield wait_until(self, lambda: registry.device("dev-b").online, timeout=5,
                         what="the replica showing it online")

    @defer.inlineCallbacks
    def test_a_claim_in_doubt_never_lands_after_the_device_went_offline(self):
        """A claim (going online) whose call timed out is kept; if the device goes
        offline before it is sent again, the offline write is queued behind it, so
        the device ends offline in Redis (held by nobody), not online for good."""
        proxy, clock, registry, number, rounds_armed = yield self.registry_on_a_clock()
        proxy.hold()
        claimed, = yield self.outcome(clock, registry.set_connection("dev-b", online=True))
        self.assertIsInstance(claimed.value, errors.StoreError)
        registry.set_connection("dev-b", online=False).addErrback(lambda _: None)
        clock.advance(0)
        proxy.release()
        yield self.rounds(clock, registry, number, 4)
        self.assertEqual(self.presence(number), (False, None))
        yield wait_until(self, lambda: not registry._queues, timeout=5, what="nothing queued")
        self.assertFalse(registry.device("dev-b").online)

    @defer.inlineCallbacks
    def test_connection_lost_after_a_conditional_write_is_no_version_conflict(self):
        """A desired write with If-Match whose reply was lost fails with StoreError, not
        with a VersionConflict against its own change (what a re-send answered)."""
        proxy = CuttingProxy(self, self.redis_port)
        registry = self.open_registry(proxy.port)
        yield registry.add_device("dev-2")
        proxy.cut_reply(OK_REPLY)
        d = registry.update_desired("dev-2", {"led": "on"}, expected_version=1)
        failure = yield self.assertFailure(d, errors.RegistryError)
        self.assertIsInstance(failure, errors.StoreError)
        yield wait_until(self, lambda: registry.device("dev-2").version == 2,
                         what="the change on the stream")

    @defer.inlineCallbacks
    def test_a_server_that_stops_answering_fails_writes_in_bounded_time(self):
        """With redis-server stopped (SIGSTOP: a hung host or a partition), a write fails
        with StoreError after the store's timeout instead of waiting forever; once the
        server answers again, writes succeed."""
        registry = self.open_registry(self.redis_port, timeout=1.0)
        yield registry.add_device("dev-3")
        os.kill(self.redis_process.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.redis_process.pid, signal.SIGCONT)
        d = registry.update_reported("dev-3", {"t": 1})
        outcome = []
        d.addBoth(outcome.append)
        yield wait_until(self, lambda: outcome, timeout=10, what="the write to fail")
        self.assertIsInstance(outcome[0].value, errors.StoreError)
        os.kill(self.redis_process.pid, signal.SIGCONT)
        result = yield registry.update_reported("dev-3", {"t": 2})
        self.assertEqual(dict(registry.device("dev-3").reported), {"t": 2})
        self.assertGreaterEqual(result.version, 2)

    @defer.inlineCallbacks
    def test_changes_trimmed_before_a_cut_off_process_read_them_are_caught_up(self):
        """A process cut off from Redis while the change stream was trimmed past its
        place catches up with the devices as Redis holds them (a report, a session
        record, an add and a removal it never read) instead of keeping stale versions
        and an old sequence-number reservation, and writes again."""
        proxy = CuttingProxy(self, self.redis_port)
        a = self.open_registry(self.redis_port)
        b = self.open_registry(proxy.port, timeout=1.0)
        for name in ("dev-m", "dev-r", "dev-k", "dev-s"):
            yield a.add_device(name)
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        proxy.hold()
        yield a.update_reported("dev-m", {"t": 1})
        record = SessionRecord(session_id=5, acked_remote_num=2, seq_reservation=8192)
        yield a.save_session(a.device("dev-s").device_number, record)
        yield a.add_device("dev-n")
        yield a.remove_device("dev-r")
        self.direct.xtrim("{ssp}:feed", maxlen=0)   # exact: all B did not read is gone
        yield a.update_reported("dev-k", {"t": 9})  # the fleet goes on writing
        proxy.release()
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B caught up")
        self.assertEqual(b.device("dev-m").version, 2)
        self.assertEqual(dict(b.device("dev-m").reported), {"t": 1})
        self.assertIsNotNone(b.device("dev-n"))
        self.assertIsNone(b.device("dev-r"))
        self.assertEqual(dict(b.device("dev-k").reported), {"t": 9})
        self.assertEqual(b.session_record(b.device("dev-s").device_number), record)
        self.assertEqual(b.counters["stream_resync"], 1)
        d = b.update_reported("dev-m", {"t": 2})
        outcome = []
        d.addBoth(outcome.append)
        yield wait_until(self, lambda: outcome, timeout=10, what="B's write")
        self.assertEqual(outcome[0].version, 3)

    @defer.inlineCallbacks
    def test_reconnections_keep_one_client_per_thread(self):
        """Connections the server closes again and again are replaced, not piled up:
        the store keeps one client per thread, and commands are still relayed."""
        registry = self.open_registry(self.redis_port)
        relayed = []
        registry.relay_to(lambda number, command: relayed.append(number) or True)
        connector = registry._store._connector
        for i in range(5):
            self.direct.client_kill_filter(_type="normal", skipme=True)
            self.direct.client_kill_filter(_type="pubsub", skipme=True)
            yield registry.add_device(f"dev-{i}")   # fires once the reader read it again
        self.assertLessEqual(len(connector._clients), 3)
        yield wait_until(self, lambda: self.direct.pubsub_numsub("{ssp}:cmd")[0][1] == 1,
                         what="the command listener subscribed again")
        self.direct.publish("{ssp}:cmd", cbor2.dumps([7, "elsewhere", {"op": "x"}]))
        yield wait_until(self, lambda: relayed == [7], what="the relayed command")

    @defer.inlineCallbacks
    def test_a_busy_reactor_holds_a_few_batches_of_stream_entries_in_memory(self):
        """While the reactor is busy, the stream reader waits for it to take a batch
        before it reads more: the entries waiting in memory are a few batches
        (MAX_BATCHES_WAITING), not everything written meanwhile; all are applied
        once the reactor is free."""
        registry = self.open_registry(self.redis_port)
        admin = RedisAdmin.open(RedisOptions(url=f"redis://127.0.0.1:{self.redis_port}/0"))
        self.addCleanup(admin.close)
        yield registry.add_device("dev-0")
        # The reactor is busy (this test, synchronously) while 40 devices are added.
        for i in range(1, 41):
            admin.add_device(f"dev-{i}")
            time.sleep(0.01)
        # Hand-overs run this turn stay listed until it ends (this test resumed
        # inside one): those waiting carry a device the registry has not seen.
        deliver = registry._deliver
        waiting = [call for call in reactor.threadCallQueue if deliver in call[1]
                   and any(entry[0] == "a" and registry.device(entry[4]) is None
                           for entry in call[1][1])]
        self.assertGreater(len(waiting), 0)
        self.assertLessEqual(len(waiting), MAX_BATCHES_WAITING)
        yield wait_until(self, lambda: registry.device("dev-40") is not None,
                         what="every device added")
        self.assertTrue(all(registry.device(f"dev-{i}") for i in range(41)))

    @defer.inlineCallbacks
    def test_a_cursor_from_a_process_ahead_never_resets_on_a_lagging_one(self):
        """A cursor another process handed out, beyond what a lagging process applied
        and beyond the top of the sequence it learned a moment before, is answered
        "nothing yet", not with a reset, and resumes there once it caught up; a cursor
        Redis never handed out gets the reset once Redis was asked."""
        proxy = CuttingProxy(self, self.redis_port)
        a = self.open_registry(self.redis_port)
        b = self.open_registry(proxy.port)
        yield a.add_device("dev-c")
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        proxy.hold()
        yield a.update_reported("dev-c", {"t": 1})
        self.assertFalse(b.changes_since(a.cursor).reset)   # B asks Redis for its top
        proxy.release()
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B caught up")
        # Lagging again, within a second of learning the top.
        proxy.hold()
        yield a.update_reported("dev-c", {"t": 2})
        cursor = a.cursor
        batch = b.changes_since(cursor)
        self.assertEqual((batch.devices, batch.reset, batch.cursor), ([], False, cursor))
        proxy.release()
        yield wait_until(self, lambda: b.cursor == cursor, what="B caught up again")
        batch = b.changes_since(cursor - 1)
        self.assertFalse(batch.reset)
        self.assertEqual([(v.name, v.cursor) for v in batch.devices], [("dev-c", cursor)])
        # Beyond anything Redis holds (it lost data): the reset, once Redis said so.
        self.assertFalse(b.changes_since(cursor + 1000).reset)
        yield wait_until(self, lambda: b.changes_since(cursor + 1000).reset,
                         what="the reset of a cursor Redis never handed out")


class RedisRestartTests(TestCase):
    """Redis restarted (AOF with fsync on every write) under two running processes."""

    timeout = 60

    @defer.inlineCallbacks
    def test_processes_carry_on_after_redis_restarts(self):
        """Writes acknowledged before Redis was killed are there after its restart;
        writes while it is down fail with StoreError; afterwards the other process's
        stream reader and command subscription are back: its observer hears a new
        change and a relayed command reaches it."""
        port, process = start_server_process(self, "--appendonly", "yes",
                                             "--appendfsync", "always")
        url = f"redis://127.0.0.1:{port}/0"
        a = open_shared_registry(RedisOptions(url=url, timeout=1.0), reactor=reactor,
                                 lease_ttl=0)
        b = open_shared_registry(RedisOptions(url=url, timeout=1.0), reactor=reactor,
                                 lease_ttl=0)
        for registry in (a, b):
            registry.start()
            self.addCleanup(registry.stop)
        relayed = []
        b.relay_to(lambda number, command: relayed.append(number) or True)
        yield a.add_device("dev-1")
        acked = yield a.update_reported("dev-1", {"t": 1})

        process.kill()
        process.wait(10)
        yield self.assertFailure(a.update_reported("dev-1", {"t": 2}), errors.StoreError)
        with open(os.devnull, "wb") as sink:
            again = subprocess.Popen(process.args, stdout=sink, stderr=subprocess.STDOUT)
        self.addCleanup(again.wait, 10)
        self.addCleanup(again.kill)
        direct = redis.Redis(host="127.0.0.1", port=port)
        self.addCleanup(direct.close)
        yield wait_until(self, lambda: _answers(direct), what="Redis back")
        self.assertEqual(int(direct.hget(f"{{ssp}}:d:{a.device('dev-1').device_number}", "v")),
                         acked.version)

        heard = []
        b.subscribe(["dev-*"], heard.append)
        result = yield _retry_store(lambda: a.update_reported("dev-1", {"t": 3}))
        yield wait_until(self, lambda: [v for v in heard if v.version == result.version],
                         what="B's observer after the restart")
        self.assertEqual(dict(b.device("dev-1").reported), {"t": 3})
        yield wait_until(self, lambda: direct.pubsub_numsub("{ssp}:cmd")[0][1] >= 1,
                         what="B subscribed again")
        heard_by = yield a.relay_command(7, {"op": "x"})
        self.assertEqual(heard_by, 1)
        yield wait_until(self, lambda: relayed == [7], what="the relayed command")


def _answers(client):
    try:
        return client.ping()
    except redis.RedisError:
        return False


@defer.inlineCallbacks
def _retry_store(write, attempts=20):
    """``write()``'s result, trying again (0.1 s apart) while it fails with StoreError:
    the first write on a connection Redis closed by restarting fails."""
    for _ in range(attempts - 1):
        try:
            result = yield write()
            return result
        except errors.StoreError:
            yield task.deferLater(reactor, 0.1, lambda: None)
    result = yield write()
    return result


class RedisLostDataTests(TestCase):
    """Redis that lost data under running processes (FLUSHALL, an older snapshot):
    writes are refused, loudly, and never acknowledged."""

    timeout = 60

    def setUp(self):
        self.redis_port, self.redis_process = start_server_process(self)
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis_port)
        self.addCleanup(self.direct.close)
        self.critical = capture_critical(self)

    def open_registry(self, **check):
        """A started registry (``sequence_check_interval``: how often its quiet
        stream reader asks Redis; by default, 5 s: later than the writes here)."""
        registry = open_shared_registry(RedisOptions(url=self.url, timeout=2.0),
                                        reactor=reactor, lease_ttl=0, **check)
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    @defer.inlineCallbacks
    def fleet(self, registry):
        """Two devices and a few changes: the cursor applied here is well above 1."""
        yield registry.add_device("dev-1")
        yield registry.add_device("dev-2")
        for i in range(3):
            yield registry.update_reported("dev-1", {"t": i})

    @defer.inlineCallbacks
    def test_a_write_after_flushall_fails_and_so_does_every_later_one(self):
        """After FLUSHALL a device's write fails with StoreError (not "unknown device"),
        one critical line says the data set's marker is gone and gives the remedy,
        every later write (report, token) fails at once, reads still serve the
        replica, and the readiness check names the problem."""
        registry = self.open_registry()
        yield self.fleet(registry)
        marker = (self.direct.get("{ssp}:incarnation") or b"").decode()
        self.direct.flushall()
        failure = yield self.assertFailure(registry.update_reported("dev-1", {"t": 9}),
                                           errors.StoreError)
        self.assertIn("Redis lost data", str(failure))
        self.assertEqual(len(self.critical), 1)
        self.assertIn(f"{{ssp}}:incarnation is gone (this broker process loaded the data set "
                      f"marked {marker})", self.critical[0])
        self.assertIn("Restore Redis from its persistence", self.critical[0])
        later = [registry.update_reported("dev-2", {"x": 1}), registry.add_token("write"),
                 registry.update_desired("dev-1", {"led": "on"})]
        for d in later:
            self.assertIn("Redis lost data", str(self.failureResultOf(d, errors.StoreError).value))
        self.assertEqual(dict(registry.device("dev-1").reported), {"t": 2})
        self.assertIn("Redis lost data", registry.readiness())
        self.assertEqual(self.direct.dbsize(), 0)   # nothing written to Redis again

    @defer.inlineCallbacks
    def test_add_device_after_flushall_fails(self):
        """add_device after FLUSHALL, whose script Redis runs and answers with a cursor
        below the one applied here, fails with StoreError instead of reporting a device
        that never appears; the readiness check names the problem."""
        registry = self.open_registry()
        yield self.fleet(registry)
        self.direct.flushall()
        failure = yield self.assertFailure(registry.add_device("dev-new"), errors.StoreError)
        self.assertIn("Redis lost data", str(failure))
        self.assertIsNone(registry.device("dev-new"))
        self.assertIn("Redis lost data", registry.readiness())
        self.failureResultOf(registry.add_device("dev-other"), errors.StoreError)

    @defer.inlineCallbacks
    def restore_older_snapshot(self, registry, *followers):
        """Redis restarted from a snapshot taken before dev-2's last two changes
        (once ``followers`` read them too)."""
        yield self.fleet(registry)
        self.direct.save()                          # the snapshot: dump.rdb
        yield registry.update_reported("dev-2", {"after": 1})
        yield registry.update_reported("dev-2", {"after": 2})
        yield wait_until(self, lambda: all(f.cursor == registry.cursor for f in followers),
                         what="the followers in step")
        self.redis_process.kill()
        self.redis_process.wait(10)
        again = subprocess.Popen(self.redis_process.args, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT)
        self.addCleanup(again.wait, 10)
        self.addCleanup(again.kill)
        yield wait_until(self, lambda: _answers(self.direct), what="Redis back")
        self.assertEqual(int(self.direct.hget(
            f"{{ssp}}:d:{registry.device('dev-1').device_number}", "v")),
            registry.device("dev-1").version)

    @defer.inlineCallbacks
    def test_a_write_to_redis_restored_from_an_older_snapshot_is_refused(self):
        """Redis restarted from an older snapshot answers a change of a device it has at
        the replica's version with "ok" and a cursor this process applied for another
        change: the write fails with StoreError, never acknowledged."""
        registry = self.open_registry()
        yield self.restore_older_snapshot(registry)
        failure = yield _refused(self, lambda: registry.update_reported("dev-1", {"t": 7}))
        self.assertIn("Redis lost data: its change sequence is at", str(failure))
        self.assertEqual(dict(registry.device("dev-1").reported), {"t": 2})
        self.assertIn("Redis lost data", registry.readiness())

    @defer.inlineCallbacks
    def test_a_device_redis_holds_at_an_older_version_is_refused(self):
        """A change of a device Redis holds at an older version than the replica's
        ("stale" with a lower version, which no resend can fix) is refused for lost
        data, even once the sequence grew past this process's cursor again."""
        registry = self.open_registry()
        yield self.restore_older_snapshot(registry)
        self.direct.incrby("{ssp}:seq", 100)       # the fleet wrote on meanwhile
        failure = yield _refused(self, lambda: registry.update_reported("dev-2", {"t": 7}))
        version = registry.device("dev-2").version     # two changes after the snapshot
        self.assertIn(f"device dev-2 is at version {version - 2} in Redis, behind version "
                      f"{version}", str(failure))
        self.assertEqual(dict(registry.device("dev-2").reported), {"after": 2})

    @defer.inlineCallbacks
    def test_a_process_that_writes_nothing_notices_an_older_snapshot_on_its_own(self):
        """A second process that writes nothing notices from its quiet stream reader,
        within a few check intervals, that Redis restarted from an older snapshot (the
        same data set, so the same marker) set its sequence back below what it read,
        and refuses its writes (the Deferred fires at once)."""
        a = self.open_registry()
        b = self.open_registry(sequence_check_interval=0.2)
        yield self.restore_older_snapshot(a, b)
        yield wait_until(self, lambda: b.counters["redis_lost"] == 1, timeout=10,
                         what="B noticing")
        self.assertIn("Redis lost data: its change sequence is at", b.readiness())
        self.failureResultOf(b.update_reported("dev-1", {"t": 9}), errors.StoreError)

    @defer.inlineCallbacks
    def test_readyz_answers_503_once_redis_lost_data(self):
        """A broker on Redis answers /readyz with 503 and the reason once Redis lost data,
        and /metrics counts it (broker_registry_events_total{event="redis_lost"})."""
        from tests.helpers import http_json, loopback_config, start_broker
        running = yield start_broker(self, loopback_config(
            self, registry={"backend": "redis", "redis_url": self.url}))
        registry = running.service.registry
        yield self.fleet(registry)
        url = running.http_url + "/readyz"
        code, _, body = yield http_json(self, "GET", url)
        self.assertEqual(code, 200)
        self.direct.flushall()
        yield self.assertFailure(registry.add_device("dev-new"), errors.StoreError)
        code, _, body = yield http_json(self, "GET", url)
        self.assertEqual(code, 503)
        self.assertTrue(any("Redis lost data" in reason for reason in body["reasons"]))
        lost = running.service.metrics.registry.get_sample_value(
            "broker_registry_events_total", {"event": "redis_lost"})
        self.assertEqual(lost, 1)


@defer.inlineCallbacks
def _refused(testcase, write, attempts=50):
    """The failure of ``write()`` once Redis is back and it is refused for lost data
    (the first writes after a restart fail on closed connections); fails the test
    if a write is acknowledged."""
    for _ in range(attempts):
        try:
            result = yield write()
        except errors.StoreError as e:
            if "Redis lost data" in str(e):
                return e
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            testcase.fail(f"a write to the older Redis was acknowledged: {result}")
    testcase.fail("the write was never refused")
