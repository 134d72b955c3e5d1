"""Tests for broker.ssp.session: the sans-IO driver, time explicit."""

import dataclasses
import json
import os
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.crypto import (TO_CLIENT, TO_SERVER, CipherCache,
                               open_sealed, seal)
from broker.ssp.datagram import decode_plaintext
from broker.ssp.device_state import DeviceState
from broker.ssp.errors import DropReason
from broker.ssp.fragment import Fragment
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp.instruction import (Instruction, decode_instruction,
                                    encode_instruction)
from broker.ssp.keys import parse_key
from broker.ssp.mosh_states import HostState, Resize, UserStream
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.session import (SEQ_RESERVATION_BLOCK, ParkedSession,
                                Resumption, SSPSession)

from tests.ssp.linksim import (BROKER_ADDRESS, DEVICE_ADDRESS, DEVICE_SECRET,
                               ConfirmingLink, Link, RecordingCiphers,
                               broker_pair, seeded_random_bytes)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_vectors(name):
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)


def zeros(n):
    """random_bytes giving no chaff, so output is byte-exact."""
    return bytes(n)


def of_type(found, kind):
    return [event for event in found if isinstance(event, kind)]


def deliver(source, target, now, address):
    """Send everything ``source`` has due to ``target`` at once."""
    out = source.datagrams_to_send(now)
    for data, _ in out:
        target.receive_datagram(data, address, now)
    return out


def restarted_broker(ciphers, now, resume, **options):
    """The broker session of broker_pair rebuilt after a restart from the
    persisted ``resume`` (options: ack_requires_confirm, seq_reserved)."""
    empty = DeviceState.empty()
    return SSPSession(
        key=DEVICE_SECRET, cipher_provider=ciphers, is_server=True,
        local_state=empty, remote_state=empty, now=now, profile=FLEET,
        random_bytes=seeded_random_bytes(9), framing=BrokerFraming(42, 7),
        resume=resume, **options)


def recorded_link(link_type=Link, **options):
    """A device and a broker session (broker_pair at t=10, options such as
    ack_requires_confirm) joined by ``link_type``, every sealed nonce recorded,
    the device's first state ({"a": 1}) set. Returns (ciphers, device,
    broker, link)."""
    ciphers = RecordingCiphers()
    device, broker = broker_pair(10.0, ciphers=ciphers, **options)
    link = link_type(device, broker)
    device.set_local_state(DeviceState.empty().with_values({"a": 1}), 10.0)
    return ciphers, device, broker, link


def decode_out(session, data):
    """The instruction inside one of ``session``'s outgoing datagrams."""
    if session.framing is not None:
        data = data[HEADER_SIZE:]
    _, _, plaintext = open_sealed(CipherCache().get(session.key), data)
    _, _, payload = decode_plaintext(plaintext)
    return decode_instruction(Fragment.decode(payload).contents)


def held_ack_run(*, period, lag, ticks=400, step=0.005):
    """Drive a device and a broker (acks held until durable) in ``step``
    increments: a new device state every ``period`` steps, each received
    state confirmed durable ``lag`` seconds after it came. Returns the
    arrival and durable time of each state number, and the broker's
    datagrams as (time, ack_num), for the states whose ack is due in time."""
    device, broker = broker_pair(10.0, ack_requires_confirm=True)
    arrived, durable, confirms, acks = {}, {}, [], []
    for tick in range(ticks):
        now = round(10.0 + tick * step, 3)
        if tick % period == 0:
            device.set_local_state(
                DeviceState.empty().with_values({"n": tick}), now)
        deliver(device, broker, now, DEVICE_ADDRESS)
        for event in of_type(broker.pop_events(), events.StateReceived):
            arrived[event.num] = now
            confirms.append((round(now + lag, 3), event.num))
        while confirms and confirms[0][0] <= now:
            when, num = confirms.pop(0)
            durable[num] = when
            broker.confirm_durable(num)
        for data, _ in deliver(broker, device, now, BROKER_ADDRESS):
            acks.append((now, decode_out(broker, data).ack_num))
        device.pop_events()
    horizon = 10.0 + ticks * step - FLEET.ack_delay - 2 * step
    late = {num for num, when in arrived.items()
            if max(when + FLEET.ack_delay, durable.get(num, horizon + 1)) > horizon}
    return ({num: when for num, when in arrived.items() if num not in late},
            durable, acks)


def first_ack(acks, num):
    """When the first of the broker's datagrams acknowledging ``num`` left."""
    return min(sent for sent, acked in acks if acked >= num)


class MoshVectorTests(SynchronousTestCase):
    """Plain mosh framing against datagrams captured from mosh-server 1.4.0."""

    def setUp(self):
        self.vectors = load_vectors("mosh-datagrams.json")
        self.key = parse_key(self.vectors["session"]["key_base64"])

    def datagrams(self, direction):
        return [bytes.fromhex(v["wire_hex"]) for v in self.vectors["vectors"]
                if v["dir"] == direction]

    def test_server_session_reads_client_datagrams(self):
        """A server session decodes mosh-client's Resize and keystrokes and
        drops diffs from states it never got (a captured gap)."""
        server = SSPSession(
            key=self.key, cipher_provider=CipherCache(), is_server=True,
            local_state=HostState.empty(), remote_state=UserStream.empty(),
            random_bytes=zeros, now=0.0)
        for data in self.datagrams("client_to_server"):
            server.receive_datagram(data, ("127.0.0.1", 40000), 0.0)
        drops = dict(server.drops)
        found = server.pop_events()
        # The session's first address is no roam.
        self.assertEqual(of_type(found, events.PeerRoamed), [])
        self.assertEqual(server.remote_address, ("127.0.0.1", 40000))
        received = of_type(found, events.StateReceived)
        self.assertEqual([e.num for e in received], [1, 2])
        self.assertEqual(received[0].state.events, (Resize(80, 24),))
        typed = bytes(e for e in received[1].state.events if type(e) is int)
        self.assertEqual(typed, b"echo hello_ssp\r")
        self.assertEqual(drops, {DropReason.UNKNOWN_REFERENCE: 2})
        self.assertEqual(server.ack_num, 2)

    def test_client_session_reads_server_datagrams(self):
        """A client session reassembles mosh-server's two-fragment
        instruction and sees the echoed command's output."""
        client = SSPSession(
            key=self.key, cipher_provider=CipherCache(), is_server=False,
            local_state=UserStream.empty(), remote_state=HostState.empty(),
            random_bytes=zeros, now=0.0, remote_address=("127.0.0.1", 60001))
        for data in self.datagrams("server_to_client"):
            client.receive_datagram(data, ("127.0.0.1", 60001), 0.0)
        drops = dict(client.drops)
        found = client.pop_events()
        # State 1 (an empty diff from state 0) changes nothing: no event.
        self.assertEqual([e.num for e in of_type(found, events.StateReceived)],
                         [3, 4, 5])
        self.assertIn(b"hello_ssp", client.latest_remote_state.host_bytes)
        self.assertEqual(client.latest_remote_num, 5)
        # The last datagram acks the client's shutdown but references a
        # state this capture never delivered.
        self.assertEqual(drops, {DropReason.UNKNOWN_REFERENCE: 1})
        self.assertEqual(client.drops, {})  # forgotten by pop_events
        self.assertEqual(of_type(found, events.PeerRoamed), [])

    def test_rejected_datagrams_counted_not_raised(self):
        """The replay, wrong-direction and tampered datagrams mosh-server
        rejected are refused and counted; the replay moves nothing."""
        server = SSPSession(
            key=self.key, cipher_provider=CipherCache(), is_server=True,
            local_state=HostState.empty(), remote_state=UserStream.empty(),
            random_bytes=zeros, now=0.0)
        first = self.datagrams("client_to_server")[0]
        server.receive_datagram(first, ("127.0.0.1", 40000), 0.0)
        server.pop_events()
        for item in self.vectors["rejected_by_server"]:
            server.receive_datagram(bytes.fromhex(item["wire_hex"]),
                                    ("127.0.0.1", 40001), 1.0)
        self.assertEqual(server.remote_address, ("127.0.0.1", 40000))
        self.assertEqual(dict(server.drops),
                         {DropReason.WRONG_DIRECTION: 1,
                          DropReason.AUTH_FAILED: 1})
        self.assertEqual(
            [e.reason for e in of_type(server.pop_events(),
                                       events.DatagramRejected)],
            [DropReason.WRONG_DIRECTION, DropReason.AUTH_FAILED])

    def test_client_output_is_mosh_wire_format(self):
        """A client session's first datagram has the nonce, seq 0, a
        timestamp and a [0=>1] instruction carrying its Resize."""
        client = SSPSession(
            key=self.key, cipher_provider=CipherCache(), is_server=False,
            local_state=UserStream.empty(), remote_state=HostState.empty(),
            random_bytes=zeros, now=52.123,
            remote_address=("127.0.0.1", 60001))
        client.set_local_state(UserStream.empty().with_resize(80, 24))
        [(data, address)] = client.datagrams_to_send(52.123)
        self.assertEqual(address, ("127.0.0.1", 60001))
        direction, seq, plaintext = open_sealed(CipherCache().get(self.key),
                                                data)
        self.assertEqual((direction, seq), (0, 0))
        timestamp, reply, payload = decode_plaintext(plaintext)
        self.assertEqual((timestamp, reply), (52123, 0xFFFF))
        first = self.vectors["vectors"][0]
        self.assertEqual(payload[:10].hex(), "00000000000000018000")
        inst = decode_instruction(Fragment.decode(payload).contents)
        self.assertEqual((inst.old_num, inst.new_num, inst.diff.hex()),
                         (0, 1, first["instruction"]["diff_hex"]))


class BrokerVectorTests(SynchronousTestCase):
    """The broker framing against tests/broker-framing.json."""

    def setUp(self):
        self.vectors = load_vectors("broker-framing.json")
        self.secret = bytes.fromhex(self.vectors["device_secret_hex"])

    def session(self, vector, is_server, now, **kwargs):
        empty = DeviceState.empty()
        return SSPSession(
            key=self.secret, cipher_provider=CipherCache(),
            is_server=is_server, local_state=empty, remote_state=empty,
            random_bytes=zeros, now=now, profile=FLEET,
            framing=BrokerFraming(vector["device_number"],
                                  vector["session_id"]), **kwargs)

    def test_session_key_derived_from_secret(self):
        """With the broker framing the session derives its key (HKDF)."""
        for vector in self.vectors["vectors"]:
            session = self.session(vector, True, 0.0)
            self.assertEqual(session.key.hex(), vector["session_key_hex"])

    def test_device_first_datagram_byte_exact(self):
        """A device session's first datagram is the vector byte for byte."""
        vector = self.vectors["vectors"][0]
        device = self.session(vector, False, 1.0,
                              remote_address=BROKER_ADDRESS)
        [(data, _)] = device.datagrams_to_send(1.0)
        self.assertEqual(data.hex(), vector["wire_hex"])

    def test_broker_answer_byte_exact(self):
        """The broker answers the device's first datagram with the vector's
        bytes: it acks state 1 and sends its own empty state 1."""
        first, answer = self.vectors["vectors"][:2]
        broker = self.session(first, True, 0.5)
        # 1.0035 s: 1003 ms on the wire, without float truncation to 1002.
        broker.receive_datagram(bytes.fromhex(first["wire_hex"]),
                                DEVICE_ADDRESS, 1.0035)
        self.assertEqual(broker.latest_remote_num, 1)
        [(data, address)] = broker.datagrams_to_send(1.0035)
        self.assertEqual(address, DEVICE_ADDRESS)
        self.assertEqual(data.hex(), answer["wire_hex"])

    def test_heartbeat_vector_answered(self):
        """The device's later heartbeat [1=>2] acks the broker's state 1 and
        is answered within the ack delay (the broker keeps no timer)."""
        first, _, heartbeat = self.vectors["vectors"][:3]
        broker = self.session(first, True, 0.5)
        broker.receive_datagram(bytes.fromhex(first["wire_hex"]),
                                DEVICE_ADDRESS, 1.003)
        broker.datagrams_to_send(1.003)
        self.assertIsNone(broker.next_wakeup())
        broker.receive_datagram(bytes.fromhex(heartbeat["wire_hex"]),
                                DEVICE_ADDRESS, 26.0)
        found = broker.pop_events()
        self.assertIn(events.StateAcknowledged(1), found)
        self.assertEqual(of_type(found, events.StateReceived), [])
        self.assertAlmostEqual(broker.next_wakeup(), 26.0 + FLEET.ack_delay)
        [(data, _)] = broker.datagrams_to_send(26.1)
        inst = decode_out(broker, data)
        self.assertEqual((inst.old_num, inst.new_num, inst.ack_num,
                          inst.throwaway_num), (1, 2, 2, 1))

    def test_large_numbers_vector(self):
        """A session with u64-extreme device number and session id decodes
        its vector and takes the RTT sample it carries."""
        vector = self.vectors["vectors"][3]
        broker = self.session(vector, True, 0.0)
        broker.receive_datagram(bytes.fromhex(vector["wire_hex"]),
                                DEVICE_ADDRESS, 0.012)
        self.assertEqual(broker.latest_remote_num, 1)
        self.assertEqual(broker.drops, {})


class SessionTests(SynchronousTestCase):
    """Two sessions joined by a link, with the broker framing."""

    def test_states_flow_both_ways(self):
        """Values and events set at either end arrive at the other and are
        acknowledged."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        empty = DeviceState.empty()
        device.set_local_state(empty.with_values({"t": 21}).with_events("up"),
                               10.0)
        broker.set_local_state(empty.with_values({"led": True}), 10.0)
        link.run_until(12.0, 10.0)
        self.assertEqual(dict(broker.latest_remote_state.values), {"t": 21})
        self.assertEqual(dict(device.latest_remote_state.values),
                         {"led": True})
        received = of_type(link.broker_events, events.StateReceived)
        self.assertEqual([e.state.events_since(0) for e in received],
                         [("up",)])
        self.assertTrue(of_type(link.device_events, events.StateAcknowledged))
        self.assertTrue(of_type(link.broker_events, events.StateAcknowledged))

    def test_idle_broker_has_no_timer(self):
        """Once everything is acknowledged a fleet broker needs no wakeup
        and holds no assembly or event list."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        device.set_local_state(DeviceState.empty().with_values({"a": 1}),
                               10.0)
        link.run_until(11.0, 10.0)
        self.assertIsNone(broker.next_wakeup())
        self.assertIsNone(broker._assembly)
        self.assertEqual(broker.pop_events(), [])
        self.assertEqual(device.next_wakeup(), 10.0 + FLEET.ack_interval)
        self.assertFalse(hasattr(broker, "__dict__"))

    def test_device_heartbeats_keep_it_online(self):
        """The device heartbeats every 25 s and the broker answers each, so
        the broker never detaches while the device lives."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        link.run_until(200.0, 10.0)
        self.assertEqual(of_type(link.broker_events, events.PeerDetached), [])
        self.assertGreaterEqual(device.latest_remote_num, 7)
        self.assertGreater(broker.last_heard, 200.0 - FLEET.ack_interval)

    def test_roaming_and_replay(self):
        """An authentic newer datagram from a new address moves the broker
        (one PeerRoamed: the first address is no roam); a replayed old one
        from elsewhere does not."""
        device, broker = broker_pair(10.0)
        first = device.datagrams_to_send(10.0)
        broker.receive_datagram(first[0][0], DEVICE_ADDRESS, 10.0)
        device.set_local_state(DeviceState.empty().with_values({"x": 1}),
                               10.5)
        second = device.datagrams_to_send(10.6)
        moved = ("198.51.100.7", 1234)
        broker.receive_datagram(second[0][0], moved, 10.6)
        broker.receive_datagram(first[0][0], ("203.0.113.9", 9), 10.7)
        self.assertEqual(broker.remote_address, moved)
        self.assertEqual(
            of_type(broker.pop_events(), events.PeerRoamed),
            [events.PeerRoamed(moved)])
        out = broker.datagrams_to_send(10.8)
        self.assertEqual({address for _, address in out}, {moved})

    def test_garbage_and_foreign_headers_counted(self):
        """Short data, another framing version, another session's header
        and bad tags are dropped with their reason, never raised."""
        device, broker = broker_pair(10.0)
        [(good, _)] = device.datagrams_to_send(10.0)
        other = BrokerFraming(42, 8).header + good[HEADER_SIZE:]
        tampered = good[:-1] + bytes([good[-1] ^ 1])
        for data in (b"", b"\x01\x00", b"\x02" + good[1:], other, tampered,
                     good[:HEADER_SIZE + 10]):
            broker.receive_datagram(data, DEVICE_ADDRESS, 10.0)
        self.assertEqual(dict(broker.drops), {
            DropReason.SHORT: 3, DropReason.UNKNOWN_FRAMING: 1,
            DropReason.BAD_HEADER: 1, DropReason.AUTH_FAILED: 1})
        self.assertIsNone(broker.remote_address)
        self.assertEqual(broker.datagrams_to_send(10.1), [])

    def test_association_timeout_detaches_server(self):
        """A mosh server not hearing its client for 40 s stops sending until
        an authentic datagram arrives again."""
        device, broker = broker_pair(10.0, profile=MOSH)
        link = Link(device, broker)
        link.run_until(11.0, 10.0)
        self.assertIsNotNone(broker.remote_address)
        # The client goes silent: nothing it sends arrives.
        link.loss = 1.0
        link.run_until(60.0, 11.0)
        self.assertEqual(len(of_type(link.broker_events, events.PeerDetached)),
                         1)
        self.assertIsNone(broker.remote_address)
        self.assertIsNone(broker.next_wakeup())
        link.loss = 0.0
        link.run_until(80.0, 60.0)
        self.assertEqual(broker.remote_address, DEVICE_ADDRESS)
        # Attaching (first, and again at the same address) is no roam.
        self.assertEqual(of_type(link.broker_events, events.PeerRoamed), [])

    def test_detach_comes_after_the_send(self):
        """As in mosh's Connection::send, the server sends the datagram that
        falls due after the association timeout, then detaches; a call
        with nothing due detaches nothing."""
        device, broker = broker_pair(10.0, profile=MOSH)
        [(data, _)] = device.datagrams_to_send(10.0)
        broker.receive_datagram(data, DEVICE_ADDRESS, 10.0)
        now = 10.0
        while now <= 10.0 + MOSH.server_association_timeout:
            self.assertLessEqual(len(broker.datagrams_to_send(now)), 1)
            self.assertEqual(broker.remote_address, DEVICE_ADDRESS)
            now = broker.next_wakeup()
        # Nothing due yet, past the timeout: still attached.
        self.assertEqual(broker.datagrams_to_send(now - 0.5), [])
        self.assertEqual(broker.remote_address, DEVICE_ADDRESS)
        [(last, address)] = broker.datagrams_to_send(now)  # the heartbeat
        self.assertEqual(address, DEVICE_ADDRESS)
        self.assertEqual(decode_out(broker, last).diff, b"")
        self.assertIsNone(broker.remote_address)
        self.assertEqual(of_type(broker.pop_events(), events.PeerDetached),
                         [events.PeerDetached()])
        self.assertIsNone(broker.next_wakeup())

    def test_acks_wait_for_durability(self):
        """With ack_requires_confirm a state is acked only after
        confirm_durable, and then within the ack delay."""
        device, broker = broker_pair(10.0, ack_requires_confirm=True)
        link = Link(device, broker)
        device.set_local_state(DeviceState.empty().with_values({"a": 1}),
                               10.0)
        link.run_until(12.0, 10.0)
        [received] = of_type(link.broker_events, events.StateReceived)
        self.assertEqual(broker.ack_num, 0)
        self.assertNotIn(events.StateAcknowledged(received.num),
                         link.device_events)
        broker.confirm_durable(received.num)
        self.assertEqual(broker.ack_num, received.num)
        link.run_until(12.2, 12.0)
        self.assertIn(events.StateAcknowledged(received.num),
                      link.device_events)

    def test_held_acks_keep_the_ack_delay(self):
        """A device reporting faster than ACK_DELAY, each state durable 50 ms
        after it came (so a newer one is always in flight), gets one ack per
        ACK_DELAY or so, not one per state, and every state's ack leaves
        within ACK_DELAY of its arrival."""
        arrived, durable, acks = held_ack_run(period=8, lag=0.05)
        self.assertGreaterEqual(len(arrived), 45)
        self.assertLess(len(acks), len(arrived) * 2 / 3)
        for num, when in arrived.items():
            self.assertLessEqual(first_ack(acks, num) - when,
                                 FLEET.ack_delay + 1e-6)

    @settings(max_examples=40, deadline=None)
    @given(period=st.integers(1, 40), lag=st.integers(0, 60))
    def test_held_ack_never_late(self, period, lag):
        """Whatever the report period and the store's delay, a state's ack
        leaves by ACK_DELAY after its arrival or at once when it becomes
        durable, whichever is later."""
        arrived, durable, acks = held_ack_run(period=period, lag=lag * 0.005)
        self.assertTrue(arrived)
        for num, when in arrived.items():
            due = max(when + FLEET.ack_delay, durable[num])
            self.assertLessEqual(first_ack(acks, num), due + 1e-6)

    def test_held_ack_after_a_lost_state_keeps_the_ack_delay(self):
        """A gap in the peer's numbers (a state lost on the way) does not
        make a later confirmation ack at once: the state after the gap is
        acknowledged ACK_DELAY after its own arrival, as mosh would."""
        device, broker = broker_pair(10.0, ack_requires_confirm=True)
        cipher = CipherCache().get(broker.key)
        header = broker.framing.header
        empty = DeviceState.empty()
        one = empty.with_values({"a": 1})
        three = empty.with_values({"a": 3})

        def arrive(seq, old, new, diff, now):
            inst = Instruction(old_num=old, new_num=new, ack_num=0,
                               throwaway_num=0, diff=diff)
            payload = Fragment(seq + 1, 0, True,
                               encode_instruction(inst)).encode()
            broker.receive_datagram(
                seal(cipher, TO_SERVER, seq, bytes(4) + payload, header),
                DEVICE_ADDRESS, now)

        arrive(0, 0, 1, one.diff_from(empty), 10.0)
        # mosh's first tick is due at once: nothing to acknowledge yet.
        [(data, _)] = broker.datagrams_to_send(10.0)
        self.assertEqual(decode_out(broker, data).ack_num, 0)
        arrive(2, 1, 3, three.diff_from(one), 10.05)  # state 2 was lost
        received = of_type(broker.pop_events(), events.StateReceived)
        self.assertEqual([event.num for event in received], [1, 3])
        broker.confirm_durable(1)
        self.assertAlmostEqual(broker.next_wakeup(), 10.0 + FLEET.ack_delay)
        [(data, _)] = broker.datagrams_to_send(10.1)
        self.assertEqual(decode_out(broker, data).ack_num, 1)
        broker.confirm_durable(3)
        self.assertAlmostEqual(broker.next_wakeup(), 10.05 + FLEET.ack_delay)
        self.assertEqual(broker.datagrams_to_send(10.11), [])
        [(data, _)] = broker.datagrams_to_send(10.15)
        self.assertEqual(decode_out(broker, data).ack_num, 3)

    def test_heartbeats_acked_without_confirmation(self):
        """A heartbeat after a confirmed state changes nothing durable and
        is acked at once."""
        device, broker = broker_pair(10.0, ack_requires_confirm=True)
        link = Link(device, broker)
        device.set_local_state(DeviceState.empty().with_values({"a": 1}),
                               10.0)
        link.run_until(11.0, 10.0)
        [received] = of_type(link.broker_events, events.StateReceived)
        broker.confirm_durable(received.num)
        link.run_until(40.0, 11.0)
        self.assertGreater(broker.ack_num, received.num)
        self.assertEqual(broker.ack_num, broker.latest_remote_num)
        self.assertEqual(len(of_type(link.broker_events,
                                     events.StateReceived)), 1)

    def test_shutdown_handshake(self):
        """The device's shutdown is requested, acknowledged, and both ends
        close."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        link.run_until(11.0, 10.0)
        device.start_shutdown(11.0)
        link.run_until(13.0, 11.0)
        self.assertIn(events.ShutdownRequested(), link.broker_events)
        self.assertIn(events.PeerShutdownAcknowledged(), link.broker_events)
        self.assertIn(events.ShutdownAcknowledged(), link.device_events)
        self.assertTrue(broker.closed)
        self.assertTrue(device.closed)
        self.assertIsNone(device.next_wakeup())
        self.assertEqual(device.datagrams_to_send(20.0), [])

    def test_held_shutdown_ack_paced_as_mosh(self):
        """With acks held until durable, confirming the peer's shutdown
        state makes its ack due as mosh's calculate_timers would (one send
        interval after our last send, here at once), not ACK_DELAY later."""
        device, broker = broker_pair(10.0, ack_requires_confirm=True)
        link = ConfirmingLink(device, broker)
        link.run_until(11.0, 10.0)
        device.set_local_state(DeviceState.empty().with_values({"bye": 1}),
                               11.0)
        device.start_shutdown(11.0)
        now = 11.0 + FLEET.send_mindelay
        [(data, _)] = device.datagrams_to_send(now)
        broker.receive_datagram(data, DEVICE_ADDRESS, now)
        [received] = of_type(broker.pop_events(), events.StateReceived)
        self.assertEqual(received.num, 2**64 - 1)
        broker.confirm_durable(received.num)
        self.assertLessEqual(broker.next_wakeup(), now)
        [(answer, _)] = broker.datagrams_to_send(now)
        self.assertEqual(decode_out(broker, answer).ack_num, 2**64 - 1)
        self.assertIn(events.PeerShutdownAcknowledged(), broker.pop_events())

    def test_shutdown_times_out(self):
        """Unanswered, the shutdown gives up (16 tries or 10 s)."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        link.run_until(11.0, 10.0)
        link.loss = 1.0
        device.start_shutdown(11.0)
        link.run_until(30.0, 11.0)
        self.assertEqual(of_type(link.device_events, events.ShutdownTimedOut),
                         [events.ShutdownTimedOut()])
        self.assertTrue(device.closed)

    def test_large_state_fragments_within_mtu(self):
        """A state too big for one datagram goes in fragments that each fit
        the MTU (1252 IPv4, 1216 IPv6) and carry at least 10 payload bytes;
        the peer reassembles them."""
        for address, mtu in ((("192.0.2.10", 1), 1252),
                             (("2001:db8::1", 1, 0, 0), 1216)):
            device, broker = broker_pair(10.0, device_address=address)
            link = Link(device, broker, device_address=address)
            link.run_until(10.5, 10.0)
            blob = random.Random(3).randbytes(6000)
            broker.set_local_state(
                DeviceState.empty().with_values({"blob": blob}), 10.5)
            out = broker.datagrams_to_send(11.0)
            self.assertGreater(len(out), 4)
            self.assertTrue(all(len(data) <= mtu for data, _ in out))
            self.assertEqual(max(len(data) for data, _ in out), mtu)
            for data, _ in out:
                device.receive_datagram(data, BROKER_ADDRESS, 11.0)
            self.assertEqual(device.latest_remote_state.values["blob"], blob)
            self.assertEqual(device.drops, {})

    def test_fragments_interrupted_by_a_whole_instruction(self):
        """A one-datagram instruction in the middle of a fragmented one is
        applied and drops the partial assembly (mosh: one instruction id at
        a time); the lost fragment, resent, completes the big one."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        link.run_until(10.5, 10.0)
        empty = DeviceState.empty()
        broker.set_local_state(empty.with_values({"x": 1}), 10.5)
        [(small, _)] = broker.datagrams_to_send(10.6)
        blob = random.Random(4).randbytes(4000)
        broker.set_local_state(empty.with_values({"x": 1, "blob": blob}),
                               10.6)
        wakeup = broker.next_wakeup()
        self.assertLess(wakeup, 11.0)
        big = [data for data, _ in broker.datagrams_to_send(wakeup)]
        self.assertGreater(len(big), 2)
        device.receive_datagram(big[0], BROKER_ADDRESS, 10.7)
        device.receive_datagram(small, BROKER_ADDRESS, 10.7)
        self.assertEqual(dict(device.latest_remote_state.values), {"x": 1})
        for data in big[1:]:
            device.receive_datagram(data, BROKER_ADDRESS, 10.7)
        self.assertNotIn("blob", device.latest_remote_state.values)
        device.receive_datagram(big[0], BROKER_ADDRESS, 10.8)
        self.assertEqual(device.latest_remote_state.values["blob"], blob)
        self.assertEqual(device.drops, {})

    def test_short_plaintext_is_a_bad_fragment(self):
        """An authentic datagram whose payload is under the 10-byte fragment
        header is dropped as BAD_FRAGMENT and changes no state."""
        device, broker = broker_pair(10.0)
        cipher = CipherCache().get(broker.key)
        for size in (4, 13):
            data = seal(cipher, TO_SERVER, size, bytes(size),
                        BrokerFraming(42, 7).header)
            broker.receive_datagram(data, DEVICE_ADDRESS, 10.0)
        self.assertEqual(dict(broker.drops), {DropReason.BAD_FRAGMENT: 2})
        self.assertEqual(broker.latest_remote_num, 0)

    def test_resume_after_broker_restart(self):
        """A broker rebuilt from persisted facts continues the session: no
        sequence number reused, new state numbers above the old ones, the
        device's next state accepted."""
        ciphers, device, broker, link = recorded_link()
        empty = DeviceState.empty()
        broker.set_local_state(empty.with_values({"cmd": "x"}), 10.0)
        link.run_until(12.0, 10.0)
        floor = broker.next_seq + 10  # the persisted reservation
        old_nums = broker.acknowledged_num
        restarted = restarted_broker(
            ciphers, 30.0,
            Resumption(broker.latest_remote_num, broker.latest_remote_state,
                       floor),
            seq_reserved=floor + SEQ_RESERVATION_BLOCK)
        restarted.set_local_state(empty.with_values({"cmd": "y"}), 30.0)
        link.broker = restarted
        device.set_local_state(empty.with_values({"a": 2}), 30.0)
        link.run_until(35.0, 30.0)
        self.assertEqual(dict(restarted.latest_remote_state.values), {"a": 2})
        self.assertEqual(dict(device.latest_remote_state.values),
                         {"cmd": "y"})
        self.assertGreater(device.latest_remote_num, floor)
        self.assertGreater(restarted.acknowledged_num, old_nums)
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))

    def test_resume_unsticks_a_device_behind(self):
        """If the broker made a state durable but crashed before acking it,
        the device still sends diffs from an older state; the resumed broker
        acks the durable state on first contact so the device moves on."""
        ciphers, device, broker, link = recorded_link(ack_requires_confirm=True)
        empty = DeviceState.empty()
        link.run_until(10.05, 10.0)
        [first] = of_type(link.broker_events, events.StateReceived)
        broker.confirm_durable(first.num)
        link.run_until(10.5, 10.05)
        self.assertEqual(device.acknowledged_num, first.num)
        device.set_local_state(empty.with_values({"a": 2}), 10.5)
        link.run_until(10.55, 10.5)
        second = of_type(link.broker_events, events.StateReceived)[-1]
        self.assertEqual(dict(second.state.values), {"a": 2})
        # Persisted, then the broker died before confirming on the wire.
        restarted = restarted_broker(
            ciphers, 11.0,
            Resumption(second.num, second.state, broker.next_seq + 100),
            ack_requires_confirm=True)
        link.broker = restarted
        link.broker_events = []
        device.set_local_state(empty.with_values({"a": 3}), 11.0)
        link.run_until(14.0, 11.0)
        self.assertIn(events.StateAcknowledged(second.num),
                      link.device_events)
        newest = of_type(link.broker_events, events.StateReceived)[-1]
        self.assertEqual(dict(newest.state.values), {"a": 3})
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))

    def test_resume_below_an_acknowledged_heartbeat(self):
        """After a restart the persisted state may be older than the
        device's acknowledged front (a heartbeat acked as unchanged, not
        persisted); the resumed broker applies the device's diffs from that
        front to the persisted state, which has the same content."""
        ciphers, device, broker, link = recorded_link(ConfirmingLink,
                                                      ack_requires_confirm=True)
        empty = DeviceState.empty()
        link.run_until(11.0, 10.0)
        [persisted] = of_type(link.broker_events, events.StateReceived)
        link.run_until(40.0, 11.0)  # a heartbeat, acked as unchanged
        self.assertGreater(device.acknowledged_num, persisted.num)
        restarted = restarted_broker(
            ciphers, 41.0,
            Resumption(persisted.num, persisted.state, broker.next_seq + 100),
            ack_requires_confirm=True)
        link.broker = restarted
        link.broker_events = []
        device.set_local_state(empty.with_values({"a": 2}), 41.0)
        link.run_until(43.0, 41.0)
        self.assertEqual(dict(restarted.latest_remote_state.values), {"a": 2})
        self.assertEqual(
            of_type(link.broker_events, events.DatagramRejected), [])
        self.assertEqual(device.acknowledged_num, device._sender.back_num)
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))

    def test_sequence_reservation(self):
        """The session never uses a sequence number at or above the
        confirmed reservation; it asks for more in time."""
        device, broker = broker_pair(10.0)
        broker = SSPSession(
            key=DEVICE_SECRET, cipher_provider=CipherCache(), is_server=True,
            local_state=DeviceState.empty(), remote_state=DeviceState.empty(),
            now=10.0, profile=FLEET, random_bytes=seeded_random_bytes(2),
            framing=BrokerFraming(42, 7), seq_reserved=2)
        link = Link(device, broker)
        empty = DeviceState.empty()
        for step in range(6):
            device.set_local_state(empty.with_values({"n": step}),
                                   10.0 + step)
            link.run_until(11.0 + step, 10.0 + step)
        requests = of_type(link.broker_events,
                           events.SequenceReservationRequested)
        self.assertEqual(requests, [events.SequenceReservationRequested(
            2 + SEQ_RESERVATION_BLOCK)])
        self.assertEqual(broker.next_seq, 2)
        self.assertIsNone(broker.next_wakeup())
        broker.confirm_seq_reservation(requests[0].limit)
        link.run_until(20.0, 16.0)
        self.assertGreater(broker.next_seq, 2)
        self.assertEqual(dict(broker.latest_remote_state.values), {"n": 5})
        self.assertEqual(of_type(link.device_events, events.DatagramRejected),
                         [])

    def test_set_local_state_without_now(self):
        """Without ``now`` the change still goes out at the next call."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        link.run_until(11.0, 10.0)
        broker.set_local_state(DeviceState.empty().with_values({"k": 1}))
        # SEND_MINDELAY starts at the first call that sees the change.
        self.assertEqual(broker.datagrams_to_send(11.0), [])
        self.assertAlmostEqual(broker.next_wakeup(),
                               11.0 + FLEET.send_mindelay)
        out = broker.datagrams_to_send(broker.next_wakeup())
        self.assertEqual(len(out), 1)
        self.assertNotEqual(decode_out(broker, out[0][0]).diff, b"")

    def test_forged_datagrams_get_no_answer(self):
        """Datagrams that fail authentication (garbage, another key, our
        own direction) set no timer, draw no reply and move no address."""
        device, broker = broker_pair(10.0)
        link = Link(device, broker)
        device.set_local_state(DeviceState.empty().with_values({"a": 1}),
                               10.0)
        link.run_until(12.0, 10.0)
        self.assertIsNone(broker.next_wakeup())  # idle: FLEET only answers
        header = broker.framing.header
        forged = [
            header + bytes(40),
            seal(CipherCache().get(bytes(16)), TO_SERVER, 10**6, bytes(16),
                 header),
            seal(CipherCache().get(broker.key), TO_CLIENT, 10**6, bytes(16),
                 header),
        ]
        for data in forged:
            broker.receive_datagram(data, ("203.0.113.9", 4), 13.0)
        self.assertEqual(dict(broker.drops),
                         {DropReason.AUTH_FAILED: 2,
                          DropReason.WRONG_DIRECTION: 1})
        self.assertIsNone(broker.next_wakeup())
        self.assertEqual(broker.datagrams_to_send(13.5), [])
        self.assertEqual(broker.remote_address, DEVICE_ADDRESS)

    def test_resume_never_seals_below_the_floor(self):
        """A resumed session seals its first datagram at the persisted
        floor, and refuses a reservation below it (a reused nonce)."""
        ciphers = RecordingCiphers()
        empty = DeviceState.empty()
        options = dict(key=DEVICE_SECRET, cipher_provider=ciphers,
                       is_server=True, local_state=empty, remote_state=empty,
                       now=30.0, profile=FLEET, random_bytes=zeros,
                       framing=BrokerFraming(42, 7),
                       remote_address=DEVICE_ADDRESS,
                       resume=Resumption(0, empty, 5000))
        self.assertRaises(ValueError, SSPSession, seq_reserved=4999,
                          **options)
        resumed = SSPSession(seq_reserved=5000 + SEQ_RESERVATION_BLOCK,
                             **options)
        resumed.set_local_state(empty.with_values({"cmd": 1}), 30.0)
        out = resumed.datagrams_to_send(30.0 + FLEET.send_mindelay)
        self.assertEqual(len(out), 1)
        (nonce_value,) = struct.unpack_from(">Q", out[0][0], HEADER_SIZE)
        self.assertEqual(nonce_value, (1 << 63) | 5000)
        [(_, nonce)] = ciphers.sealed
        self.assertEqual(nonce, struct.pack(">4xQ", (1 << 63) | 5000))

    def test_pop_events_empties(self):
        """Events are handed out once."""
        device, broker = broker_pair(10.0)
        broker.receive_datagram(b"junk", DEVICE_ADDRESS, 10.0)
        self.assertEqual(len(broker.pop_events()), 1)
        self.assertEqual(broker.pop_events(), [])

    def test_profile_values(self):
        """FLEET keeps mosh's pacing but heartbeats every 25 s, calls a
        device offline after three missed heartbeats and only answers."""
        self.assertEqual(FLEET.ack_interval, 25.0)
        self.assertEqual(FLEET.offline_after, 75.0)
        self.assertFalse(FLEET.broker_heartbeats)
        self.assertEqual((FLEET.ack_delay, FLEET.send_interval_min),
                         (MOSH.ack_delay, MOSH.send_interval_min))
        self.assertRaises(ValueError, dataclasses.replace, MOSH,
                          ack_delay=0)

    def test_outgoing_names_importable_from_session(self):
        """SEQ_RESERVATION_BLOCK still imports from session (the send path
        lives in broker.ssp.outgoing) and sessions stay slotted."""
        from broker.ssp import outgoing, session
        self.assertEqual(session.SEQ_RESERVATION_BLOCK, 4096)
        self.assertIs(session.SEQ_RESERVATION_BLOCK,
                      outgoing.SEQ_RESERVATION_BLOCK)
        self.assertTrue(issubclass(SSPSession, outgoing.Outgoing))
        self.assertFalse(hasattr(broker_pair(1.0)[1], "__dict__"))


class ParkTests(SynchronousTestCase):
    """Idle sessions reduced to plain values and rebuilt."""

    def settle(self):
        ciphers, device, broker, link = recorded_link(ConfirmingLink,
                                                      ack_requires_confirm=True)
        empty = DeviceState.empty()
        broker.set_local_state(empty.with_values({"led": 1}), 10.0)
        link.run_until(12.0, 10.0)
        return ciphers, device, broker, link

    def test_parking_values_importable_from_session(self):
        """Resumption and ParkedSession still import from session (they
        live in broker.ssp.parking) and sessions stay slotted."""
        from broker.ssp import parking, session
        self.assertIs(session.Resumption, parking.Resumption)
        self.assertIs(session.ParkedSession, parking.ParkedSession)
        # The Parking mixin adds no per-session dict.
        self.assertFalse(hasattr(broker_pair(1.0)[1], "__dict__"))

    def test_park_and_unpark_continue_the_session(self):
        """A parked and unparked broker session goes on as before: states
        flow both ways, nothing is sent unasked, no nonce is reused."""
        ciphers, device, broker, link = self.settle()
        parked = broker.park()
        self.assertIsInstance(parked, ParkedSession)
        self.assertEqual(parked.remote_num, broker.latest_remote_num)
        self.assertEqual(parked.local_num, broker.acknowledged_num)
        awake = SSPSession.unpark(
            parked, remote_state=broker.latest_remote_state,
            cipher_provider=ciphers, random_bytes=seeded_random_bytes(5),
            now=30.0, profile=FLEET, ack_requires_confirm=True)
        self.assertIsNone(awake.next_wakeup())
        self.assertEqual(awake.datagrams_to_send(30.0), [])
        self.assertEqual(awake.key, broker.key)
        self.assertEqual(awake.framing, broker.framing)
        link.broker = awake
        link.broker_events = []
        empty = DeviceState.empty()
        device.set_local_state(empty.with_values({"a": 2}), 30.0)
        awake.set_local_state(empty.with_values({"led": 2}), 30.0)
        link.run_until(33.0, 30.0)
        self.assertEqual(dict(awake.latest_remote_state.values), {"a": 2})
        self.assertEqual(dict(device.latest_remote_state.values), {"led": 2})
        self.assertEqual(of_type(link.device_events, events.DatagramRejected),
                         [])
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))

    def test_unparked_session_keeps_its_rto(self):
        """Parking keeps the RTT estimate whole (SRTT and RTTVAR), so the
        unparked session retransmits on the same RTO; a parked form
        without RTTVAR takes SRTT as mosh takes a first sample."""
        ciphers = RecordingCiphers()
        device, broker = broker_pair(10.0, ciphers=ciphers,
                                     ack_requires_confirm=True)
        link = ConfirmingLink(device, broker, delay=(0.15, 0.15))
        for step in range(12):  # a steady 300 ms round trip
            now = 10.0 + step
            device.set_local_state(
                DeviceState.empty().with_values({"n": step}), now)
            link.run_until(now + 1.0, now)
        rtt = broker.rtt
        self.assertLess(rtt.rttvar, 0.05)
        self.assertLess(rtt.rto, 0.5)
        parked = broker.park()
        options = dict(remote_state=broker.latest_remote_state,
                       cipher_provider=ciphers,
                       random_bytes=seeded_random_bytes(5), now=30.0,
                       profile=FLEET, ack_requires_confirm=True)
        awake = SSPSession.unpark(parked, **options)
        self.assertAlmostEqual(awake.rtt.srtt, rtt.srtt)
        self.assertAlmostEqual(awake.rtt.rttvar, rtt.rttvar)
        self.assertAlmostEqual(awake.rtt.rto, rtt.rto)
        coarse = SSPSession.unpark(
            dataclasses.replace(parked, rttvar=None), **options)
        self.assertAlmostEqual(coarse.rtt.srtt, rtt.srtt)
        self.assertAlmostEqual(coarse.rtt.rttvar, rtt.srtt / 2)

    def test_parked_session_repr_hides_the_key(self):
        """A parked session logged by its owner does not show its key."""
        _, _, broker, _ = self.settle()
        parked = broker.park()
        self.assertNotIn(repr(parked.key), repr(parked))
        self.assertIn("next_seq", repr(parked))

    def test_parked_session_keeps_replay_protection(self):
        """The unparked session still refuses to move for an old sequence
        number, and moves for a new one."""
        ciphers, device, broker, link = self.settle()
        awake = SSPSession.unpark(
            broker.park(), remote_state=broker.latest_remote_state,
            cipher_provider=ciphers, random_bytes=seeded_random_bytes(5),
            now=40.0, profile=FLEET, ack_requires_confirm=True)
        self.assertEqual(awake.next_seq, broker.next_seq)
        cipher = CipherCache().get(broker.key)
        header = broker.framing.header
        elsewhere = ("203.0.113.1", 1)
        replayed = seal(cipher, TO_SERVER, 0, bytes(16), header)
        awake.receive_datagram(replayed, elsewhere, 40.0)
        self.assertEqual(awake.remote_address, DEVICE_ADDRESS)
        fresh = seal(cipher, TO_SERVER, 10**6, bytes(16), header)
        awake.receive_datagram(fresh, elsewhere, 40.0)
        self.assertEqual(awake.remote_address, elsewhere)

    def test_busy_session_does_not_park(self):
        """A session with unsent data, an unconfirmed state or pending
        events is not parked."""
        ciphers, device, broker, link = self.settle()
        broker.set_local_state(DeviceState.empty().with_values({"x": 1}),
                               20.0)
        self.assertIsNone(broker.park())
        _, device, broker, link = self.settle()
        device.set_local_state(DeviceState.empty().with_values({"a": 5}),
                               20.0)
        for data, _ in device.datagrams_to_send(20.1):
            broker.receive_datagram(data, DEVICE_ADDRESS, 20.1)
        self.assertIsNone(broker.park())  # event pending, ack held
        broker.pop_events()
        self.assertIsNone(broker.park())  # not confirmed yet


class UnknownReferenceTests(SynchronousTestCase):
    """A peer building on a state we do not hold is told what we hold."""

    def test_unknown_reference_is_answered(self):
        """An answering broker acks what it holds when a diff refers to an
        unknown state, so a device that missed the ack is not stuck."""
        device, broker = broker_pair(10.0)
        for data, _ in device.datagrams_to_send(10.0):
            broker.receive_datagram(data, DEVICE_ADDRESS, 10.0)
        broker.datagrams_to_send(10.0)
        self.assertIsNone(broker.next_wakeup())
        inst = Instruction(old_num=5, new_num=6, ack_num=0, throwaway_num=5,
                           diff=b"")
        payload = (bytes(8) + b"\x80\x00") + encode_instruction(inst)
        data = seal(CipherCache().get(broker.key), TO_SERVER, 7,
                    bytes(4) + payload, broker.framing.header)
        broker.receive_datagram(data, DEVICE_ADDRESS, 20.0)
        self.assertEqual(dict(broker.drops),
                         {DropReason.UNKNOWN_REFERENCE: 1})
        self.assertAlmostEqual(broker.next_wakeup(), 20.0 + FLEET.ack_delay)
        [(answer, _)] = broker.datagrams_to_send(20.1)
        self.assertEqual(decode_out(broker, answer).ack_num, 1)
