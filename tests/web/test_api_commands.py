"""Commands for a device that is online over HTTP but has no SSP session to carry them.

A device heard over HTTP shows ``connection.online``; commands travel only
on SSP sessions, so "resend once it is online" would never work for it: it
gets its own answer, 409 no_ssp_session, distinct from device_offline.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.commands import CommandRefused, CommandSender
from tests.helpers import start_broker
from tests.web.test_api_rest import Client
from tests.web.test_commands import command_config


class HTTPDeviceCommandTests(TestCase):
    """POST /devices/NAME/commands on a live broker with SSP, devices talking HTTP."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, command_config(self))
        self.registry = self.broker.service.registry
        self.device = yield self.registry.add_device("http-1")
        yield self.registry.add_device("idle-1")
        _, token = yield self.registry.add_token("write")
        self.write = b"Bearer " + token.encode()
        self.client = Client(self, self.broker.http_url)

    @defer.inlineCallbacks
    def test_online_http_device_gets_no_ssp_session(self):
        """A device online over HTTP gets 409 no_ssp_session (not device_offline, whose
        advice "send it when the device is connected" it already meets); nothing is queued."""
        status, _, body = yield self.client.call(
            "POST", "/devices/http-1/reported", b"Device " + self.device.key.encode(), {"t": 1})
        self.assertEqual((status, body["connection"]["online"]), (200, True))
        status, _, body = yield self.client.call("POST", "/devices/http-1/commands",
                                                 self.write, {"op": "reboot"})
        self.assertEqual((status, body["error"]["code"]), (409, "no_ssp_session"))
        self.assertIn("SSP", body["error"]["message"])
        endpoint = self.broker.service.ssp_endpoint
        self.assertIsNone(endpoint.entry_of(self.device.device_number))

    @defer.inlineCallbacks
    def test_offline_device_still_gets_device_offline(self):
        """A device not connected at all keeps 409 device_offline."""
        status, _, body = yield self.client.call("POST", "/devices/idle-1/commands",
                                                 self.write, {"op": "reboot"})
        self.assertEqual((status, body["error"]["code"]), (409, "device_offline"))


class SessionlessEndpoint:
    """Stands in for SSPEndpoint.send_command in a process holding no session."""

    def send_command(self, device_number, *commands):
        return None


class RelayingRegistry(DeviceRegistry):
    """A registry whose relayed commands reach ``receivers`` processes (this one included)."""

    receivers = 1

    def relay_command(self, device_number, command):
        return defer.succeed(self.receivers)


class RelayedSessionlessTests(SynchronousTestCase):
    """With workers or Redis, a relay nobody took for a device shown online."""

    def setUp(self):
        self.registry = RelayingRegistry(MemoryStore(), clock=Clock(),
                                         settings=RegistrySettings(reload_interval=0))
        self.successResultOf(self.registry.add_device("http-1"))
        self.successResultOf(self.registry.set_connection("http-1", online=True))
        self.sender = CommandSender(self.registry, SessionlessEndpoint())

    def test_unheard_relay_for_an_online_device_is_no_ssp_session(self):
        """Only this process heard the relay of a command for an online device: no broker
        holds an SSP session of it, 409 no_ssp_session, counted under that code."""
        failure = self.failureResultOf(self.sender.send("http-1", 1), CommandRefused)
        self.assertEqual((failure.value.status, failure.value.code), (409, "no_ssp_session"))
        self.assertEqual(self.sender.counters["no_ssp_session"], 1)

    def test_failed_relay_stays_relay_failed(self):
        """A relay Redis did not take is still 503 relay_failed (worth a retry)."""
        self.registry.receivers = 0
        failure = self.failureResultOf(self.sender.send("http-1", 1), CommandRefused)
        self.assertEqual((failure.value.status, failure.value.code), (503, "relay_failed"))
