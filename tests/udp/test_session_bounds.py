"""What one device can make its broker session hold (broker.ssp.bounds)."""

import struct

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.bounds import BROKER_RECEIVED_STATES, MAX_HELD_EVENTS
from broker.ssp.crypto import TO_SERVER, seal
from broker.ssp.fragment import FINAL_BIT
from broker.ssp.framing import build_header
from broker.ssp.instruction import Instruction, encode_instruction
from broker.ssp.keys import derive_session_key
from broker.udp.endpoint import assembly_bytes

from tests.udp.helpers import Harness

SESSION = 0x0000000500000001
DEVICE_ADDRESS = ("127.0.0.2", 40000)


class Device:
    """An authentic device that writes its own instructions: never an ack,
    throwaway number 0, whatever diff it likes."""

    def __init__(self, provisioned, session_id=SESSION):
        key = derive_session_key(provisioned.secret, provisioned.device_number,
                                 session_id)
        self.cipher = AESOCB3(key)
        self.header = build_header(provisioned.device_number, session_id)
        self.seq = 0

    def datagram(self, old, new, diff):
        instruction = Instruction(old_num=old, new_num=new, ack_num=0,
                                  throwaway_num=0, diff=diff)
        payload = (struct.pack(">HHQH", 0, 0xFFFF, self.seq + 1, FINAL_BIT)
                   + encode_instruction(instruction))
        data = seal(self.cipher, TO_SERVER, self.seq, payload, self.header)
        self.seq += 1
        return data


def events_diff(first, events):
    return b"\xa2\x01" + cbor2.dumps(first) + b"\x02" + cbor2.dumps(events)


def held_events(harness, device):
    receiver = harness.endpoint.session_of(device.device_number).session._receiver
    return [len(state.events) for state in receiver._states[1::2]]


class SessionBoundsTests(SynchronousTestCase):
    """An authentic device cannot make its session hold much."""

    def test_broker_sessions_are_bounded(self):
        """The endpoint's sessions keep few received states and bound each one,
        a diff within the fragment assembly cap."""
        h = Harness(self)
        profile = h.endpoint._profile
        self.assertEqual(profile.received_states_cap, BROKER_RECEIVED_STATES)
        self.assertEqual(profile.state_bounds.max_diff_bytes,
                         assembly_bytes(h.registry))
        self.assertEqual(profile.state_bounds.max_events, MAX_HELD_EVENTS)

    def test_tiny_compressed_events_never_acknowledged_stay_bounded(self):
        """A device sending 40 datagrams of ~100 bytes, each adding 20,000 events
        to the newest state and never letting the broker forget one, gets one
        state in; the others are dropped and counted as events_over_limit."""
        h = Harness(self)
        provisioned = h.provision("dev")
        device = Device(provisioned)
        sizes = []
        for num in range(1, 41):
            old, first = (0, 0) if num == 1 else (1, 20_000)
            data = device.datagram(old, num, events_diff(first, [0] * 20_000))
            sizes.append(len(data))
            h.endpoint.datagramReceived(data, DEVICE_ADDRESS)
            h.clock.advance(0.05)
        self.assertLess(max(sizes), 200)
        self.assertEqual(h.endpoint.drops["events_over_limit"], 39)
        self.assertEqual(sum(held_events(h, provisioned)), 20_000)

    def test_a_device_that_hears_no_acks_holds_few_states(self):
        """A node whose acknowledgements are all lost keeps sending new states;
        its session keeps the throwaway state and the newest 16, and the node
        is acknowledged as soon as it hears the broker again."""
        h = Harness(self)
        provisioned = h.provision("dev")
        node = h.node(provisioned, address=DEVICE_ADDRESS)
        h.run(0.5)
        h.deaf = True
        for i in range(400):
            node.report({"v": i}, h.clock.seconds())
            h.step(0.05)
        receiver = h.endpoint.session_of(provisioned.device_number).session._receiver
        self.assertEqual(receiver.count, BROKER_RECEIVED_STATES + 1)
        self.assertEqual(receiver.newest_state.values, {"v": 399})
        self.assertEqual(h.endpoint.drops["queue_full"], 0)
        h.deaf = False
        h.run(1.0, dt=0.05)
        self.assertTrue(node.idle())
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 399})

    def test_a_nodes_backlog_of_tiny_events_gets_through(self):
        """40,000 one-byte events, the most a node puts in flight at a time,
        all reach the broker and are acknowledged: none passes a bound."""
        h = Harness(self)
        node = h.node(h.provision("dev"), address=DEVICE_ADDRESS)
        h.run(0.5)
        node.emit(*([0] * 40_000), now=h.clock.seconds())
        h.run(10.0, dt=0.05)
        self.assertTrue(node.idle())
        self.assertEqual(node.backlog, 0)
        for reason in ("events_over_limit", "values_over_limit", "too_large",
                       "queue_full"):
            self.assertEqual(h.endpoint.drops[reason], 0, reason)
