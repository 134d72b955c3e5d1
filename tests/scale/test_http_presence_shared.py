"""A device that talks HTTP, its requests spread over broker processes sharing
one real Redis (as the kernel spreads connections over workers or hosts).

Each request marks the device online without claiming it (it has no SSP
session to hold): only offline -> online is a change, as on one broker,
so its long poll waits whichever process answers it. The holder (the
process that marked it online) marks it offline once silent, unless another
process told Redis it heard the device (a share): then it keeps it.
"""

import time

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from broker.registry.secrets import format_key
from broker.registry.shared import open_shared_registry
from broker.web.api.presence import SHARE_HOLDS, HTTPPresence
from tests.helpers import http_pool, loopback_config, start_broker

from .support import SingleRedis, redis_options, start_two_brokers, wait_until
from .test_presence_lease import MANUAL, LateStream, redis_client

ADDRESS = ("127.0.0.1", 40000)
#: seconds of silence before an HTTP device is shown offline (HTTPPresence).
OFFLINE_AFTER = 60.0


class _DevicePolls:
    """Mixin: device h1, added through A, and its requests to either broker."""

    @defer.inlineCallbacks
    def add_h1(self):
        self.device = yield self.ra.add_device("h1")
        self.headers = {b"authorization": [b"Device " + format_key(self.device.secret).encode()]}
        self.pool = http_pool(self)
        yield wait_until(self, lambda: self.rb.device("h1") is not None, what="B knows h1")

    @defer.inlineCallbacks
    def poll(self, broker, version, wait):
        """A long poll of h1 on ``broker``: (status, version answered, seconds it took)."""
        start = time.monotonic()
        response = yield treq.get(f"{broker.http_url}/api/v1/devices/h1?version={version}"
                                  f"&wait={wait}", headers=self.headers, pool=self.pool)
        body = yield response.json()
        return response.code, body["version"], time.monotonic() - start

    def in_step(self):
        return wait_until(self, lambda: self.ra.cursor == self.rb.cursor, what="in step")

    def connection_changes(self):
        return [dict(entry[4])["online"] for entry in self.ra.device("h1").history
                if entry[3] == "connection"]


class HTTPDeviceOnTwoBrokersTests(_DevicePolls, SingleRedis, TestCase):
    """Two whole brokers on one Redis: a device long-polls each in turn."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield start_two_brokers(self)
        yield self.add_h1()

    @defer.inlineCallbacks
    def test_long_polls_alternating_between_brokers_wait(self):
        """After going online (one change), the device's long polls on B and A in turn
        each wait out their time and answer the same version: no claim, no history entry."""
        created = self.ra.device("h1").version
        code, _, _ = yield self.poll(self.a, 0, 0)
        self.assertEqual(code, 200)
        yield wait_until(self, lambda: self.ra.device("h1").online and self.rb.device("h1").online,
                         what="h1 online")
        yield self.in_step()
        version = self.ra.device("h1").version
        self.assertEqual(version, created + 1)     # online: one change
        history = len(self.ra.device("h1").history)
        answers = []
        for broker in (self.b, self.a, self.b, self.a):
            answers.append((yield self.poll(broker, version, 1)))
        self.assertEqual([(code, v) for code, v, _ in answers], [(200, version)] * 4)
        self.assertTrue(all(took >= 0.9 for _, _, took in answers), answers)
        yield self.in_step()
        for registry in (self.ra, self.rb):
            view = registry.device("h1")
            self.assertEqual((view.version, view.online), (version, True))
            self.assertEqual(len(view.history), history)
        self.assertEqual((self.ra._held, self.rb._held), ({self.device.device_number}, set()))


#: a short offline_after (real seconds) for two whole brokers.
SHORT_OFFLINE_AFTER = 1.5


class HTTPDeviceHeldElsewhereTests(_DevicePolls, SingleRedis, TestCase):
    """Two whole brokers on one Redis (offline_after 1.5 s): a device marked online
    through A (its holder) that then talks to B only."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        url = self.start_redis()
        registry = {"backend": "redis", "redis_url": url, "redis_cluster": False}
        ssp = {"device_heartbeat": 1.0, "offline_after": SHORT_OFFLINE_AFTER}
        self.a = yield start_broker(self, loopback_config(self, registry=registry, ssp=ssp))
        self.b = yield start_broker(self, loopback_config(self, registry=registry, ssp=ssp))
        self.ra = self.a.service.registry
        self.rb = self.b.service.registry
        yield self.add_h1()
        code, _, _ = yield self.poll(self.a, 0, 0)
        self.assertEqual(code, 200)
        yield wait_until(self, lambda: self.rb.device("h1").online, what="online on B")
        yield self.in_step()

    @defer.inlineCallbacks
    def test_long_poll_waiting_on_b_keeps_the_device_online(self):
        """A 4 s long poll on B (more than twice offline_after without a request to A)
        waits its 4 s and answers the same version: A keeps the device online."""
        version = self.rb.device("h1").version
        code, answered, took = yield self.poll(self.b, version, 4)
        self.assertEqual((code, answered), (200, version))
        self.assertGreater(took, 3.5)
        self.assertEqual(self.connection_changes(), [True])
        self.assertTrue(self.ra.device("h1").online)

    @defer.inlineCallbacks
    def test_device_polling_b_stays_online(self):
        """A device polling B every 0.5 s for 4 s is never shown offline, by either
        broker, and its version stays: one connection change in all."""
        version = self.rb.device("h1").version
        seen = []
        end = time.monotonic() + 4
        while time.monotonic() < end:
            code, _, _ = yield self.poll(self.b, 0, 0)
            self.assertEqual(code, 200)
            seen.append((self.ra.device("h1").online, self.rb.device("h1").online))
            yield task.deferLater(reactor, 0.5, lambda: None)
        yield self.in_step()
        self.assertEqual(set(seen), {(True, True)})
        self.assertEqual(self.connection_changes(), [True])
        self.assertEqual(self.rb.device("h1").version, version)


class HTTPPresenceSharedTests(SingleRedis, TestCase):
    """The HTTP presence of two processes (registries on one Redis, each with its
    own HTTPPresence on a Clock driven by the test)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.url = self.start_redis()
        self.raw = redis_client(self, self.url)
        self.late = []
        self.ra = self.open("aaaa", late=self.late)
        self.rb = self.open("bbbb")
        self.clock_a, self.clock_b = Clock(), Clock()
        self.pa = HTTPPresence(self.ra, self.clock_a, OFFLINE_AFTER)
        self.pb = HTTPPresence(self.rb, self.clock_b, OFFLINE_AFTER)
        self.addCleanup(self.pa.stop)
        self.addCleanup(self.pb.stop)
        dev = yield self.ra.add_device("h1")
        self.number = dev.device_number
        yield self.in_step()

    def open(self, origin, late=None):
        registry = open_shared_registry(redis_options(self, self.url), reactor=reactor,
                                        origin=origin, **MANUAL)
        if late is not None:
            late.append(LateStream(registry))
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def in_step(self):
        return wait_until(self, lambda: self.ra.cursor == self.rb.cursor
                          and self.rb.device("h1") is not None, what="registries in step")

    @defer.inlineCallbacks
    def settled(self):
        """Every write of h1 either process queued is in Redis and applied by both."""
        yield self.ra.update_desired("h1", {})       # a barrier behind A's queued writes
        yield self.rb.update_desired("h1", {})
        yield self.in_step()

    def field(self, name):
        value = self.raw.hget("{ssp}:d:%d" % self.number, name)
        return None if value is None else value.decode()

    def holder(self):
        return self.field("h")

    def shared(self):
        """Wait until a share of h1 is in Redis (settled() does not wait for it: it
        goes to Redis beside the device's writes, not with them)."""
        return wait_until(self, lambda: self.field("hu") not in (None, "0"), what="h1 shared")

    def expire_share(self):
        """As if the shares of h1 had run out on Redis's clock (they hold real
        seconds; the test's clocks are not Redis's)."""
        self.raw.hset("{ssp}:d:%d" % self.number, "hu", 0)

    def connection_changes(self):
        return [dict(entry[4])["online"] for entry in self.ra.device("h1").history
                if entry[3] == "connection"]

    @defer.inlineCallbacks
    def test_requests_on_another_process_change_nothing(self):
        """A device online through A is heard by B, then A, then B (requests and long
        polls): its version stays, A still holds it, B holds nothing."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        version = self.ra.device("h1").version
        for presence, clock in ((self.pb, self.clock_b), (self.pa, self.clock_a),
                                (self.pb, self.clock_b)):
            clock.advance(5)
            presence.heard(self.number, ADDRESS)
            presence.hold(self.number)
            clock.advance(5)
            presence.release(self.number, ADDRESS)
        yield self.settled()
        for registry in (self.ra, self.rb):
            self.assertEqual((registry.device("h1").version, registry.device("h1").online),
                             (version, True))
        self.assertEqual(self.holder(), "aaaa")
        self.assertEqual((self.ra._held, self.rb._held), ({self.number}, set()))
        self.assertEqual(self.rb.device("h1").last_heard, self.clock_b.seconds())
        self.assertEqual(self.connection_changes(), [True])

    @defer.inlineCallbacks
    def go_silent(self, first, second):
        """h1 heard by ``first`` (which marks it online) then by ``second`` (which
        shares it), then silent: the second process's sweep comes first (its
        offline write is answered "moved"), then the holder's, answered "heard"
        while the share holds; once it ran out, the holder's next look marks the
        device offline: one offline change."""
        (p1, c1, r1), (p2, c2, r2) = first, second
        p1.heard(self.number, ADDRESS)
        yield self.settled()
        version = self.ra.device("h1").version
        c2.advance(10)
        p2.heard(self.number, ADDRESS)
        yield self.shared()
        yield self.settled()
        c2.advance(OFFLINE_AFTER)
        yield wait_until(self, lambda: r2.counters["connection_moved"] == 1, what="moved")
        self.assertTrue(r1.device("h1").online and r2.device("h1").online)
        c1.advance(OFFLINE_AFTER + 10)
        yield wait_until(self, lambda: r1.counters["connection_heard_elsewhere"] == 1,
                         what="heard elsewhere")
        yield self.settled()
        self.assertEqual((self.ra.device("h1").online, self.rb.device("h1").online,
                          self.rb.device("h1").version), (True, True, version))
        self.assertEqual(self.holder(), r1.origin)
        self.assertEqual(r1._held, {self.number})
        self.assertIn(self.number, p1)     # it looks again when the share runs out
        self.expire_share()
        c1.advance(OFFLINE_AFTER * SHARE_HOLDS)
        yield wait_until(self, lambda: not self.ra.device("h1").online
                         and not self.rb.device("h1").online, what="h1 offline")
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False])
        self.assertEqual((self.holder(), self.field("hu")), (None, None))
        self.assertFalse(self.number in self.pa or self.number in self.pb)
        self.assertFalse(self.pa._sweep.running or self.pb._sweep.running)

    @defer.inlineCallbacks
    def test_silent_device_goes_offline_once_when_held_by_a(self):
        """Heard by A then B, then silent: A (its holder) marks it offline, once, after
        B's share ran out; B's offline write is answered "moved"."""
        yield self.go_silent((self.pa, self.clock_a, self.ra), (self.pb, self.clock_b, self.rb))

    @defer.inlineCallbacks
    def test_silent_device_goes_offline_once_when_held_by_b(self):
        """Heard by B then A, then silent: B (its holder) marks it offline, once, after
        A's share ran out; A's offline write is answered "moved"."""
        yield self.go_silent((self.pb, self.clock_b, self.rb), (self.pa, self.clock_a, self.ra))

    @defer.inlineCallbacks
    def test_holder_keeps_a_device_heard_by_another_process(self):
        """A holds h1 and stops hearing it while B hears it: A's sweep, after
        offline_after, changes nothing (no version, A still holds it), and again at
        its next look while B goes on hearing it."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        version = self.ra.device("h1").version
        for round_ in (1, 2):
            self.expire_share()
            self.clock_b.advance(OFFLINE_AFTER / 2)
            self.pb.heard(self.number, ADDRESS)
            yield self.shared()
            yield self.settled()
            self.clock_a.advance(OFFLINE_AFTER * SHARE_HOLDS + 1)
            yield wait_until(self, lambda: self.ra.counters["connection_heard_elsewhere"]
                             == round_, what="heard elsewhere")
        yield self.settled()
        for registry in (self.ra, self.rb):
            self.assertEqual((registry.device("h1").version, registry.device("h1").online),
                             (version, True))
        self.assertEqual((self.holder(), self.ra._held), ("aaaa", {self.number}))
        self.assertEqual(self.connection_changes(), [True])

    @defer.inlineCallbacks
    def test_long_poll_waiting_on_another_process_shares_from_its_sweep(self):
        """A long poll of h1 waiting on B (no request meanwhile) shares again from B's
        sweep once half offline_after passed: A's offline write after its share ran
        out is still answered "heard"."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        self.pb.heard(self.number, ADDRESS)
        self.pb.hold(self.number)
        yield self.shared()
        yield self.settled()
        self.expire_share()
        self.clock_b.advance(OFFLINE_AFTER / 2 + 1)      # B's sweep: the poll still waits
        yield self.shared()     # again
        self.clock_a.advance(OFFLINE_AFTER + 1)
        yield wait_until(self, lambda: self.ra.counters["connection_heard_elsewhere"] == 1,
                         what="heard elsewhere")
        yield self.settled()
        self.assertTrue(self.rb.device("h1").online)
        self.assertEqual(self.connection_changes(), [True])

    @defer.inlineCallbacks
    def test_requests_share_at_most_once_per_half_offline_after(self):
        """Requests of h1 on B, a second apart, share it once per half offline_after;
        requests on A, its holder, send Redis no share."""
        shared = []
        share = self.rb.share_heard
        self.rb.share_heard = lambda number, seconds: shared.append(seconds) or share(
            number, seconds)
        scripts_a = []
        call = self.ra._store.call
        self.ra._store.call = lambda script, *args: scripts_a.append(script) or call(
            script, *args)
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        for _ in range(int(OFFLINE_AFTER) + 1):
            self.pb.heard(self.number, ADDRESS)
            self.pa.heard(self.number, ADDRESS)
            self.clock_b.advance(1)
            self.clock_a.advance(1)
        yield self.settled()
        self.assertEqual(shared, [OFFLINE_AFTER * SHARE_HOLDS] * 3)
        self.assertNotIn("heard", scripts_a)
        self.assertIn("change", scripts_a)      # (the spy saw A's writes)

    @defer.inlineCallbacks
    def test_a_session_ending_is_not_held_back_by_a_share(self):
        """A share of h1 by B holds back only A's HTTP offline write: A's SSP-side
        offline write (no ``unless_heard``) is applied, and clears the share."""
        yield self.ra.set_connection("h1", online=True)
        yield self.settled()
        self.pb.heard(self.number, ADDRESS)
        yield self.shared()
        yield self.ra.set_connection("h1", online=False)
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False])
        self.assertEqual((self.holder(), self.field("hu")), (None, None))

    @defer.inlineCallbacks
    def test_online_again_on_the_other_process_is_claimed_there(self):
        """Once offline, the device's next request, on B, marks it online: held by B."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        self.clock_a.advance(OFFLINE_AFTER + 1)
        yield wait_until(self, lambda: not self.rb.device("h1").online, what="offline on B")
        self.pb.heard(self.number, ADDRESS)
        yield self.settled()
        self.assertTrue(self.ra.device("h1").online)
        self.assertEqual(self.holder(), "bbbb")
        self.assertEqual(self.connection_changes(), [True, False, True])

    @defer.inlineCallbacks
    def test_marked_online_once_while_its_claim_is_on_its_way(self):
        """Two requests before the stream brought the first one's claim back make one change."""
        version = self.ra.device("h1").version
        first = self.ra.set_connection("h1", online=True, claim=False, last_heard=1.0)
        second = self.ra.set_connection("h1", online=True, claim=False, last_heard=2.0)
        yield defer.gatherResults([first, second])
        yield self.settled()
        self.assertEqual(self.rb.device("h1").version, version + 1)
        self.assertEqual(self.holder(), "aaaa")
        self.assertEqual(self.ra.device("h1").last_heard, 2.0)

    @defer.inlineCallbacks
    def test_heard_while_its_offline_write_is_queued_comes_back_online(self):
        """A request in the turn A's sweep wrote the device offline: online after it, held by A."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        self.clock_a.advance(OFFLINE_AFTER + 1)      # the sweep queues the offline write
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False, True])
        self.assertTrue(self.rb.device("h1").online)
        self.assertEqual(self.holder(), "aaaa")

    @defer.inlineCallbacks
    def test_heard_before_its_offline_write_came_back_comes_back_online(self):
        """A request after Redis took A's offline write and before A's stream brought it
        (the replica still shows the device online): online again once it came."""
        self.pa.heard(self.number, ADDRESS)
        yield self.settled()
        self.late[0].late = True
        self.clock_a.advance(OFFLINE_AFTER + 1)
        yield wait_until(self, lambda: not self.rb.device("h1").online and not self.ra._queues
                         and not self.ra._attempts, what="offline in Redis, A answered")
        self.assertTrue(self.ra.device("h1").online)     # A has not applied it yet
        self.pa.heard(self.number, ADDRESS)
        self.late[0].release()
        yield wait_until(self, lambda: self.holder() == "aaaa", what="claimed again")
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False, True])
        self.assertTrue(self.rb.device("h1").online)

    @defer.inlineCallbacks
    def test_a_claim_kept_longer_than_offline_after_is_followed_by_its_offline(self):
        """A device heard once by A while Redis refuses writes for longer than
        offline_after: A's sweep finds it silent while its claim is still kept (the
        replica shows it offline) and queues its offline behind the claim, so once
        Redis takes writes again the device ends offline and held by nobody."""
        self.raw.config_set("min-replicas-to-write", 1)
        self.addCleanup(self.raw.config_set, "min-replicas-to-write", 0)
        self.pa.heard(self.number, ADDRESS)
        yield wait_until(self, lambda: self.ra.counters["retried_failed"] >= 1,
                         what="A's claim refused and kept")
        self.assertFalse(self.ra.device("h1").online)
        self.clock_a.advance(OFFLINE_AFTER + 1)
        self.raw.config_set("min-replicas-to-write", 0)
        yield wait_until(self, lambda: self.holder() is None
                         and self.connection_changes() == [True, False]
                         and not self.rb.device("h1").online, what="h1 claimed, then offline")
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False])
        self.assertFalse(self.ra.device("h1").online)

    @defer.inlineCallbacks
    def test_a_claim_kept_through_a_refused_write_is_marked_offline_once_silent(self):
        """A device heard once by A while Redis refuses writes stays tracked by A's
        presence (its claim is kept and sent again), so once the claim landed and the
        device stayed silent, A's sweep marks it offline; before, A forgot it at the
        refusal and it stayed online, held by A, for as long as A ran."""
        self.raw.config_set("min-replicas-to-write", 1)
        self.addCleanup(self.raw.config_set, "min-replicas-to-write", 0)
        self.pa.heard(self.number, ADDRESS)
        yield wait_until(self, lambda: self.ra.counters["retried_failed"] >= 1,
                         what="A's claim refused and kept")
        self.assertIn(self.number, self.pa)
        self.raw.config_set("min-replicas-to-write", 0)
        yield wait_until(self, lambda: self.holder() == "aaaa" and self.ra.device("h1").online
                         and self.rb.device("h1").online, what="the kept claim landed")
        yield self.settled()
        self.clock_a.advance(OFFLINE_AFTER + 1)
        yield wait_until(self, lambda: not self.ra.device("h1").online
                         and not self.rb.device("h1").online, what="h1 offline")
        yield self.settled()
        self.assertEqual(self.connection_changes(), [True, False])
        self.assertEqual(self.holder(), None)
        self.assertNotIn(self.number, self.pa)
