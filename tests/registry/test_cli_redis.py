"""broker-admin with the Redis backend: a real subprocess against a real Redis,
seen by running brokers through the change stream."""

import json
import os
import sys

from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import TestCase

from broker.node.client import SSPNode
from broker.registry.secrets import parse_key
from tests.helpers import loopback_config, start_broker
from tests.scale.redis_support import free_port, start_single
from tests.scale.support import open_registry_on, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RedisCLITests(TestCase):
    """broker-admin --config (backend "redis") provisions in Redis for every broker."""

    timeout = 90
    cluster = False

    def setUp(self):
        self.url = start_single(self)
        self.config = self.write_config(self.url)
        self.registry = open_registry_on(self, self.url)

    def write_config(self, url, backend="redis"):
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as handle:
            handle.write(f'[broker]\ndata_dir = "{os.path.abspath(self.mktemp())}"\n'
                         f'[registry]\nbackend = "{backend}"\nredis_url = "{url}"\n')
        return path

    @defer.inlineCallbacks
    def admin(self, *args, expect=0, config=None):
        """Run broker-admin --json in a subprocess (the reactor keeps running)."""
        argv = ["-m", "broker.registry.cli", "--config", config or self.config, "--json", *args]
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=ROOT, reactor=reactor)
        self.assertEqual(code, expect, err.decode())
        if expect:
            self.assertEqual(len(err.decode().strip().splitlines()), 1, err.decode())
            return json.loads(err)
        return json.loads(out)

    @defer.inlineCallbacks
    def test_device_commands_reach_a_running_registry(self):
        """add, rotate-key and remove made by broker-admin show at once in a running broker's registry."""
        added = yield self.admin("device", "add", "greenhouse-7")
        number = int(added["device_number"])
        yield wait_until(self, lambda: self.registry.device("greenhouse-7") is not None,
                         what="the added device in the registry")
        self.assertEqual(self.registry.device("greenhouse-7").device_number, number)
        self.assertEqual(self.registry.secret_for(number), parse_key(added["key"]))
        listed = yield self.admin("device", "list")
        self.assertEqual([(d["name"], d["device_number"], d["online"]) for d in listed],
                         [("greenhouse-7", added["device_number"], False)])
        yield self.registry.update_reported("greenhouse-7", {"t": 20})
        shown = yield self.admin("device", "show", "greenhouse-7")
        self.assertEqual((shown["reported"], shown["version"]), ({"t": 20}, 2))
        rotated = yield self.admin("device", "rotate-key", "greenhouse-7")
        self.assertNotEqual(rotated["key"], added["key"])
        yield wait_until(self, lambda: self.registry.secret_for(number)
                         == parse_key(rotated["key"]), what="the new key in the registry")
        yield self.admin("device", "remove", "greenhouse-7")
        yield wait_until(self, lambda: self.registry.device("greenhouse-7") is None,
                         what="the device removed from the registry")
        batch = self.registry.changes_since(0)
        self.assertEqual([(v.name, v.removed) for v in batch.devices], [("greenhouse-7", True)])
        self.assertEqual((yield self.admin("device", "list")), [])

    @defer.inlineCallbacks
    def test_token_commands_reach_a_running_registry(self):
        """A token made by broker-admin is accepted by a running registry; revoked, it is refused."""
        made = yield self.admin("token", "add", "--role", "write")
        yield wait_until(self, lambda: self.registry.check_token(made["token"]) == "write",
                         what="the token valid in the registry")
        listed = yield self.admin("token", "list")
        self.assertEqual([(t["token_id"], t["role"]) for t in listed], [(made["token_id"], "write")])
        self.assertNotIn(made["token"], json.dumps(listed))
        yield self.admin("token", "revoke", made["token_id"])
        yield wait_until(self, lambda: self.registry.check_token(made["token"]) is None,
                         what="the token revoked in the registry")
        self.assertEqual((yield self.admin("token", "list")), [])

    @defer.inlineCallbacks
    def test_errors_are_one_line(self):
        """Duplicates, unknown names and tokens, and an unreachable Redis give one line and exit 1."""
        yield self.admin("device", "add", "d")
        failed = yield self.admin("device", "add", "d", expect=1)
        self.assertEqual(failed["error"], "device_exists")
        failed = yield self.admin("device", "rotate-key", "nope", expect=1)
        self.assertEqual(failed["error"], "unknown_device")
        failed = yield self.admin("token", "revoke", "zz", expect=1)
        self.assertEqual(failed["error"], "unknown_token")
        nowhere = self.write_config(f"redis://127.0.0.1:{free_port()}/0")
        failed = yield self.admin("device", "list", expect=1, config=nowhere)
        self.assertEqual(failed["error"], "store_error")
        bad = self.write_config(self.url, backend="nosql")
        failed = yield self.admin("device", "list", expect=2, config=bad)
        self.assertEqual(failed["error"], "bad_config")
        self.assertEqual(len(self.registry), 1)

    @defer.inlineCallbacks
    def test_provisioned_device_connects_to_a_running_broker(self):
        """A device broker-admin adds while a broker runs connects with the printed key and is stored."""
        broker = yield start_broker(self, loopback_config(
            self, registry={"backend": "redis", "redis_url": self.url}))
        added = yield self.admin("device", "add", "barn-1")
        registry = broker.service.registry
        yield wait_until(self, lambda: registry.device("barn-1") is not None,
                         what="the device in the broker")
        node = SSPNode(int(added["device_number"]), parse_key(added["key"]),
                       ("127.0.0.1", broker.udp_port), heartbeat=1.0)
        node.start()
        self.addCleanup(node.stop)
        node.report({"hay": 3})
        yield wait_until(self, lambda: node.session.idle(), what="the report acknowledged")
        self.assertEqual(dict(registry.device("barn-1").reported), {"hay": 3})
        yield wait_until(self, lambda: dict(self.registry.device("barn-1").reported)
                         == {"hay": 3}, what="the report on another process")
