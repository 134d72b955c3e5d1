"""[registry] redis_wait_replicas: WAIT's verdict fails only the writes it stands for."""

import redis
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.registry import errors
from broker.registry.redis_connection import RedisOptions
from broker.registry.shared import open_shared_registry

from .redis_support import start_server
from .support import wait_until


class WaitReplicasTests(TestCase):
    """A process waiting for replicas that never answer (there are none)."""

    timeout = 60

    def setUp(self):
        self.redis_port = start_server(self)
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis_port)
        self.addCleanup(self.direct.close)

    def open_registry(self, **options):
        presence = {key: options.pop(key) for key in ("lease_ttl", "lease_check_interval")
                    if key in options}
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{self.redis_port}/0", **options),
            reactor=reactor, **{"lease_ttl": 0, **presence})
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def waits(self):
        """How many WAIT commands Redis has run."""
        return self.direct.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)

    @defer.inlineCallbacks
    def test_a_delivered_relayed_command_is_answered_delivered(self):
        """A relayed command another process received is answered with the count of
        receivers, not a failure (a retry would deliver it twice), and waits for no
        replica."""
        b = self.open_registry()
        delivered = []
        b.relay_to(lambda number, command: delivered.append((number, command)) or True)
        yield wait_until(self, lambda: self.direct.pubsub_numsub("{ssp}:cmd")[0][1] == 1,
                         what="B subscribed")
        a = self.open_registry(wait_replicas=1, wait_timeout=0.2)
        receivers = yield a.relay_command(7, {"op": "reboot"})
        self.assertEqual(receivers, 1)
        yield wait_until(self, lambda: delivered, what="the delivery")
        self.assertEqual(delivered, [(7, {"op": "reboot"})])
        self.assertEqual(self.waits(), 0)

    @defer.inlineCallbacks
    def test_reads_and_the_presence_lease_are_answered_without_replicas(self):
        """The change sequence and the tokens are read, and the presence lease renewed,
        although no replica acknowledges: none of them is a write to make durable."""
        registry = self.open_registry(wait_replicas=1, wait_timeout=0.1,
                                      lease_ttl=2.0, lease_check_interval=0.5)
        top = yield registry._store.top()
        self.assertEqual(top, registry.cursor)
        yield registry.reload()
        yield wait_until(self, lambda: registry.presence.renewals >= 2,
                         what="two lease renewals")

    @defer.inlineCallbacks
    def test_a_write_still_fails_when_no_replica_acknowledges_it(self):
        """A change is refused with StoreError when too few replicas acknowledge it,
        while a command relayed in the same turn (maybe the same pipeline) is answered:
        WAIT's verdict is the write's alone."""
        registry = self.open_registry(wait_replicas=1, wait_timeout=0.1)
        outcome = []
        registry.add_device("dev-1").addBoth(outcome.append)
        relayed = registry.relay_command(7, {"op": "reboot"})
        receivers = yield relayed
        yield wait_until(self, lambda: outcome, what="the write's answer")
        self.assertIsInstance(outcome[0].value, errors.StoreError)
        self.assertIn("replicas", outcome[0].getErrorMessage())
        self.assertEqual(receivers, 0)      # nobody subscribed, and no failure
        self.assertGreaterEqual(self.waits(), 1)
