"""Presence leases: registries (standing for broker processes) on one real Redis.

A "dead" process is a registry stopped without a word (no offline writes)
whose lease key is then deleted, which is what its expiry does; checks are
run by hand (the timers are set far apart), except where the timer itself
is the subject.
"""

import redis
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import errors
from broker.registry.shared import open_shared_registry
from broker.registry.shared_presence import PresenceLease

from .support import ClusterRedis, SingleRedis, redis_options, wait_until

#: lease settings that leave checks to the test (one at start, then by hand).
MANUAL = {"lease_ttl": 600.0, "lease_check_interval": 300.0}


def redis_client(testcase, url):
    """A plain redis-py client of the test's Redis (one server or the cluster)."""
    if testcase.cluster:
        from redis.cluster import RedisCluster
        client = RedisCluster.from_url(url)
    else:
        client = redis.Redis.from_url(url)
    testcase.addCleanup(client.close)
    return client


class LateStream:
    """Holds back the change-stream entries a registry applies, while ``late``: a
    process whose stream reader lags behind the others. Made before the
    registry starts (its reader takes the registry's ``_deliver`` then)."""

    def __init__(self, registry):
        self.late = False
        self._waiting = []
        self._deliver = registry._deliver
        registry._deliver = self

    def __call__(self, entries):
        if self.late:
            self._waiting.append(entries)
        else:
            self._deliver(entries)

    def release(self):
        """Apply what was held back, and what comes from now on."""
        self.late = False
        waiting, self._waiting = self._waiting, []
        for entries in waiting:
            self._deliver(entries)


class PresenceLeaseTestsMixin:
    """Devices of a process whose lease expired go offline, and only those."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.url = self.start_redis()
        self.raw = redis_client(self, self.url)
        self.a = self.open("aaaa")
        self.b = self.open("bbbb")
        self.c = self.open("cccc")
        self.names = [f"dev-{i}" for i in range(4)]
        for name in self.names:
            yield self.a.add_device(name)
        yield self.in_step()

    def open(self, origin, late=None, **lease):
        """A started registry; ``late``: a list that gets its LateStream."""
        registry = open_shared_registry(redis_options(self, self.url), reactor=reactor,
                                        origin=origin, **(lease or MANUAL))
        if late is not None:
            late.append(LateStream(registry))
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def in_step(self, *registries):
        registries = registries or (self.a, self.b, self.c)
        return wait_until(self, lambda: len({r.cursor for r in registries}) == 1
                          and all(len(r) == len(self.names) for r in registries),
                          what="registries in step")

    def holder(self, name):
        number = self.a.device(name).device_number
        value = self.raw.hget("{ssp}:d:%d" % number, "h")
        return None if value is None else value.decode()

    def online(self, registry, name):
        return registry.device(name).online

    @defer.inlineCallbacks
    def die(self, registry):
        """Stop ``registry`` without marking anything offline, and let its lease expire."""
        yield registry.stop()
        self.raw.delete("{ssp}:lease:" + registry.origin)

    @defer.inlineCallbacks
    def test_claim_records_the_holder_everywhere(self):
        """A device going online through A is held by A in Redis and in A's set, and B and C see it online."""
        yield self.a.set_connection("dev-0", online=True)
        yield self.in_step()
        self.assertEqual(self.holder("dev-0"), "aaaa")
        number = self.a.device("dev-0").device_number
        self.assertTrue(self.raw.sismember("{ssp}:held:aaaa", str(number)))
        self.assertTrue(self.online(self.b, "dev-0") and self.online(self.c, "dev-0"))
        self.assertEqual(self.a._held, {number})
        self.assertEqual(self.b._held, set())
        yield self.a.set_connection("dev-0", online=False)
        self.assertIsNone(self.holder("dev-0"))
        self.assertFalse(self.raw.sismember("{ssp}:held:aaaa", str(number)))

    @defer.inlineCallbacks
    def test_devices_of_a_dead_process_go_offline_everywhere(self):
        """When A's lease expires, B's check marks A's devices offline on the stream (C sees it), and not B's."""
        for name in self.names[:3]:
            yield self.a.set_connection(name, online=True)
        yield self.b.set_connection("dev-3", online=True)
        yield self.in_step()
        heard = []
        self.c.subscribe(["dev-*"], heard.append)
        yield self.die(self.a)
        self.b.presence.check()
        yield wait_until(self, lambda: not any(self.online(self.c, n) for n in self.names[:3]),
                         what="A's devices offline on C")
        self.assertTrue(self.online(self.c, "dev-3"))
        self.assertEqual(self.b.counters["presence_reaped"], 3)
        self.assertEqual(sorted(v.name for v in heard if not v.online), self.names[:3])
        for name in self.names[:3]:
            self.assertIsNone(self.holder(name))
            kind, data = self.c.device(name).history[-1][3:]
            self.assertEqual((kind, dict(data)), ("connection", {"online": False}))
        self.assertTrue(self.raw.sismember("{ssp}:holders", "aaaa"))
        self.b.presence.check()
        yield wait_until(self, lambda: not self.raw.sismember("{ssp}:holders", "aaaa"),
                         what="A forgotten once it holds nothing")
        self.assertEqual(self.c.online_count, 1)

    @defer.inlineCallbacks
    def test_device_that_came_online_elsewhere_stays_online(self):
        """A device A held, now claimed by B while the registry still shows it online, survives the reaping of A."""
        yield self.a.set_connection("dev-0", online=True)
        yield self.in_step()
        yield self.die(self.a)
        version = self.b.device("dev-0").version
        yield self.b.set_connection("dev-0", online=True)     # already online: a claim
        self.assertEqual(self.b.device("dev-0").version, version + 1)
        self.assertEqual(self.holder("dev-0"), "bbbb")
        yield self.in_step(self.b, self.c)
        # C reaps A's device from a replica that shows it online: Redis says moved.
        yield defer.DeferredList(self.c._reap("aaaa", [self.c.device("dev-0").device_number]))
        self.assertEqual(self.c.counters["connection_moved"], 1)
        self.c.presence.check()
        yield wait_until(self, lambda: not self.raw.sismember("{ssp}:holders", "aaaa"),
                         what="A forgotten")
        self.assertTrue(self.online(self.c, "dev-0"))
        self.assertEqual(self.c.counters["presence_reaped"], 0)
        self.assertEqual(self.c.device("dev-0").version, version + 1)

    @defer.inlineCallbacks
    def test_old_session_ending_does_not_mark_a_moved_device_offline(self):
        """A's old session of a device now held by B ends: A's offline write is refused as moved."""
        yield self.a.set_connection("dev-1", online=True)
        yield self.in_step()
        yield self.b.set_connection("dev-1", online=True)
        yield self.in_step()
        self.assertEqual(self.a._held, set())
        yield self.a.set_connection("dev-1", online=False)
        yield self.in_step()
        self.assertTrue(self.online(self.c, "dev-1"))
        self.assertEqual(self.a.counters["connection_moved"], 1)
        self.assertEqual(self.holder("dev-1"), "bbbb")

    @defer.inlineCallbacks
    def test_live_process_whose_lease_lapsed_claims_its_devices_again(self):
        """B reaps A's devices after A's lease lapsed while A lives: A claims them again at once."""
        yield self.a.set_connection("dev-2", online=True)
        yield self.in_step()
        self.raw.delete("{ssp}:lease:aaaa")
        self.b.presence.check()
        yield wait_until(self, lambda: self.a.counters["presence_reclaimed"] == 1,
                         what="A claims again")
        yield wait_until(self, lambda: self.holder("dev-2") == "aaaa" and self.a.cursor
                         == self.c.cursor and self.online(self.c, "dev-2"), what="A holds it")
        self.assertEqual(self.b.counters["presence_reaped"], 1)
        self.a.presence.check()
        yield wait_until(self, lambda: self.a.counters["presence_lease_lost"] == 1,
                         what="A notices its lease had expired")
        self.assertTrue(self.raw.exists("{ssp}:lease:aaaa"))

    @defer.inlineCallbacks
    def test_devices_that_left_a_process_leave_its_set_at_its_next_renewal(self):
        """Devices claimed by B, or removed, while A held them leave A's set in Redis with
        A's next renewal (a claim declares only the claimer's set); one that came back
        to A meanwhile stays in it, and leaves B's set with B's renewal."""
        for name in self.names[:3]:
            yield self.a.set_connection(name, online=True)
        yield self.in_step()
        yield self.b.set_connection("dev-0", online=True)     # roams to B
        yield self.b.set_connection("dev-1", online=True)     # roams to B...
        yield self.in_step()
        yield self.a.set_connection("dev-1", online=True)     # ... and back to A
        number = {name: self.a.device(name).device_number for name in self.names}
        yield self.c.remove_device("dev-2")
        yield wait_until(self, lambda: len({r.cursor for r in (self.a, self.b, self.c)}) == 1,
                         what="registries in step")
        for registry in (self.a, self.b):
            renewals = registry.presence.renewals
            registry.presence.check()
            yield wait_until(self, lambda: registry.presence.renewals > renewals,
                             what="a renewal")
        self.assertEqual(self.held("aaaa"), {number["dev-1"]})
        self.assertEqual(self.held("bbbb"), {number["dev-0"]})
        self.assertEqual(self.a._held, {number["dev-1"]})
        self.assertEqual((self.holder("dev-0"), self.holder("dev-1")), ("bbbb", "aaaa"))

    @defer.inlineCallbacks
    def test_a_dead_process_whose_set_still_lists_a_moved_device_is_reaped_without_it(self):
        """A dies after B claimed one of its devices and before its renewal dropped it
        from A's set: C's check marks offline only the device A still held; B's stays
        online and held by B, without even an offline write for it."""
        for name in ("dev-0", "dev-1"):
            yield self.a.set_connection(name, online=True)
        yield self.in_step()
        yield self.b.set_connection("dev-0", online=True)     # roams to B
        yield self.in_step()
        number = {name: self.a.device(name).device_number for name in ("dev-0", "dev-1")}
        self.assertEqual(self.held("aaaa"), set(number.values()))     # not renewed yet
        yield self.die(self.a)
        self.c.presence.check()
        yield wait_until(self, lambda: not self.online(self.c, "dev-1"), what="dev-1 reaped")
        self.c.presence.check()
        yield wait_until(self, lambda: not self.raw.sismember("{ssp}:holders", "aaaa"),
                         what="A forgotten")
        self.assertTrue(self.online(self.c, "dev-0") and self.online(self.b, "dev-0"))
        self.assertEqual(self.holder("dev-0"), "bbbb")
        self.assertEqual(self.held("aaaa"), set())
        self.assertEqual(self.c.counters["presence_reaped"], 1)
        self.assertEqual(self.c.counters["connection_moved"], 0)

    @defer.inlineCallbacks
    def d_holding_dev0_with_its_stream_held(self):
        """A fourth process D holding dev-0, in step, whose stream is then held back:
        (D, its late stream list, dev-0's number)."""
        stream = []
        d = self.open("dddd", late=stream)
        yield self.in_step(self.a, self.b, self.c, d)
        yield d.set_connection("dev-0", online=True)
        yield self.in_step(self.a, self.b, self.c, d)
        stream[0].late = True
        return d, stream, d.device("dev-0").device_number

    @defer.inlineCallbacks
    def test_a_session_ending_after_its_device_moved_leaves_the_set(self):
        """D's old session of a device B claimed ends before D's stream shows the claim:
        D's offline write is answered "moved", and the device is not left in D's
        set in Redis after D's next renewal (Redis said another process holds it)."""
        d, stream, number = yield self.d_holding_dev0_with_its_stream_held()
        yield self.b.set_connection("dev-0", online=True)     # roams to B
        ended = d.set_connection("dev-0", online=False)       # D's session ends
        stream[0].release()
        yield ended
        self.assertEqual(d.counters["connection_moved"], 1)
        yield self.in_step(self.a, self.b, self.c, d)
        renewals = d.presence.renewals
        d.presence.check()
        yield wait_until(self, lambda: d.presence.renewals > renewals, what="a renewal")
        self.assertEqual(self.held("dddd"), set())
        self.assertEqual(self.held("bbbb"), {number})
        self.assertEqual(self.holder("dev-0"), "bbbb")
        self.assertEqual(d._held, set())

    @defer.inlineCallbacks
    def test_a_session_ending_after_its_device_was_removed_leaves_the_set(self):
        """D's session of a device C removed ends before D's stream shows the removal:
        D's offline write finds no device, and the device is not left in D's set in
        Redis after D's next renewal."""
        d, stream, number = yield self.d_holding_dev0_with_its_stream_held()
        yield self.c.remove_device("dev-0")
        yield self.assertFailure(d.set_connection("dev-0", online=False),
                                 errors.UnknownDevice)
        stream[0].release()
        yield wait_until(self, lambda: d.cursor == self.c.cursor, what="D in step")
        self.assertIsNone(d.device("dev-0"))
        renewals = d.presence.renewals
        d.presence.check()
        yield wait_until(self, lambda: d.presence.renewals > renewals, what="a renewal")
        self.assertEqual(self.held("dddd"), set())
        self.assertNotIn(number, d._held)

    @defer.inlineCallbacks
    def test_a_session_ending_before_its_claim_came_back_marks_the_device_offline(self):
        """A session that ends while the claim of its start is still on its way (the
        replica shows the device offline until the stream brings the claim) leaves
        the device offline everywhere, held by nobody, not online for good."""
        number = self.a.device("dev-0").device_number
        started = self.a.set_connection("dev-0", online=True)
        ended = self.a.set_connection("dev-0", online=False)
        yield defer.gatherResults([started, ended])
        yield self.in_step()
        self.assertEqual([self.online(r, "dev-0") for r in (self.a, self.b, self.c)],
                         [False] * 3)
        self.assertIsNone(self.holder("dev-0"))
        self.assertEqual(self.held("aaaa"), set())
        self.assertNotIn(number, self.a._held)

    def held(self, origin):
        return {int(n) for n in self.raw.smembers("{ssp}:held:" + origin)}

    @defer.inlineCallbacks
    def test_lease_has_the_configured_time_to_live(self):
        """A process's lease key expires in Redis after lease_ttl unless renewed."""
        d = self.open("dddd", lease_ttl=3.0, lease_check_interval=1.0)
        yield wait_until(self, lambda: d.presence.renewals == 1, what="first renewal")
        ttl = self.raw.pttl("{ssp}:lease:dddd")
        self.assertTrue(0 < ttl <= 3000, ttl)
        self.assertTrue(self.raw.sismember("{ssp}:holders", "dddd"))


class PresenceSingleRedisTests(SingleRedis, PresenceLeaseTestsMixin, TestCase):
    """Presence leases on one Redis server."""


class PresenceClusterTests(ClusterRedis, PresenceLeaseTestsMixin, TestCase):
    """Presence leases on a three-node Redis Cluster (every key in one slot)."""


class LeaseTimerTests(SingleRedis, TestCase):
    """The lease runs on one timer of the registry's clock, whatever the number of devices."""

    timeout = 60

    @defer.inlineCallbacks
    def test_one_timer_renews_and_checks_each_interval(self):
        """With 50 devices held, the clock holds one presence timer and each interval renews once."""
        url = self.start_redis()
        clock = Clock()
        registry = open_shared_registry(redis_options(self, url), reactor=reactor, clock=clock,
                                        lease_ttl=10.0, lease_check_interval=2.0)
        registry.start()
        self.addCleanup(registry.stop)
        adds = [registry.add_device(f"d-{i}") for i in range(50)]
        clock.advance(0)
        yield defer.gatherResults(adds)
        claims = [registry.set_connection(f"d-{i}", online=True) for i in range(50)]
        clock.advance(0)
        yield defer.gatherResults(claims)
        yield wait_until(self, lambda: registry.presence.renewals == 1, what="first check")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for renewals in (2, 3):
            clock.advance(2.0)
            yield wait_until(self, lambda: registry.presence.renewals == renewals,
                             what=f"check {renewals}")
            self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(len(registry._held), 50)


class LeaseSettingsTests(SynchronousTestCase):
    """Lease settings are checked when the registry is built."""

    def test_check_interval_must_fit_twice_in_the_ttl(self):
        """A check interval longer than half the lease TTL is refused with a ValueError."""
        with self.assertRaises(ValueError):
            PresenceLease(None, ttl=2.0, interval=1.5)
        with self.assertRaises(ValueError):
            PresenceLease(None, ttl=0, interval=1.0)
        self.assertEqual(PresenceLease(None, ttl=2.0, interval=1.0).interval, 1.0)
