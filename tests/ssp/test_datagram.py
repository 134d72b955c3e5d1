"""Tests for broker.ssp.datagram: timestamps, RTT, replay and roaming."""

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.crypto import TO_CLIENT, TO_SERVER, open_sealed, seal
from broker.ssp.datagram import (NO_TIMESTAMP, DatagramLayer, RTTEstimator,
                                 decode_plaintext, encode_plaintext,
                                 timestamp16)
from broker.ssp.errors import DatagramDropped, DropReason

CIPHER = AESOCB3(bytes(range(16)))
PAYLOAD = b"0123456789fragment"  # any payload of at least 10 bytes
A = ("127.0.0.1", 5000)
B = ("127.0.0.1", 5001)
C = ("::1", 5002, 0, 0)


class TimestampTests(SynchronousTestCase):
    """timestamp16 is mosh's 16-bit millisecond clock."""

    def test_milliseconds_mod_65536(self):
        """Whole milliseconds, truncated and wrapped at 65536."""
        self.assertEqual(timestamp16(1.2349), 1234)
        self.assertEqual(timestamp16(65.536), 0)
        self.assertEqual(timestamp16(65.537 + 65.536), 1)

    def test_sentinel_avoided(self):
        """0xFFFF means "none", so that clock value is sent as 0."""
        self.assertEqual(timestamp16(65.535), 0)
        self.assertEqual(timestamp16(65.535 + 65.536 * 3), 0)


class PlaintextTests(SynchronousTestCase):
    """encode_plaintext / decode_plaintext: two u16 then the payload."""

    def test_round_trip(self):
        """Timestamps and payload survive encoding."""
        data = encode_plaintext(0xCB9B, NO_TIMESTAMP, PAYLOAD)
        self.assertEqual(data[:4], bytes.fromhex("cb9bffff"))
        self.assertEqual(decode_plaintext(data),
                         (0xCB9B, NO_TIMESTAMP, PAYLOAD))

    def test_short_payload_never_encoded(self):
        """A payload under 10 bytes (it aborts mosh) cannot be encoded."""
        for n in range(10):
            self.assertRaises(ValueError, encode_plaintext, 1, 2, b"x" * n)
        encode_plaintext(1, 2, b"x" * 10)

    def test_short_plaintext(self):
        """A plaintext under 4 bytes is SHORT."""
        for n in range(4):
            e = self.assertRaises(DatagramDropped, decode_plaintext,
                                  b"\0" * n)
            self.assertEqual(e.reason, DropReason.SHORT)


class RTTEstimatorTests(SynchronousTestCase):
    """RTTEstimator reproduces mosh's numbers (hand-computed below)."""

    def test_initial(self):
        """SRTT 1000 ms, RTTVAR 500 ms: ceil(1000 + 2000) clamps to 1 s."""
        rtt = RTTEstimator()
        self.assertEqual((rtt.srtt, rtt.rttvar, rtt.rto), (1.0, 0.5, 1.0))

    def test_first_and_second_sample(self):
        """R=100: SRTT 100, RTTVAR 50, RTO 300; then R=200: RTTVAR
        0.75*50 + 0.25*100 = 62.5, SRTT 0.875*100 + 0.125*200 = 112.5,
        RTO ceil(112.5 + 250) = 363 ms."""
        rtt = RTTEstimator()
        self.assertTrue(rtt.add_sample_ms(100))
        self.assertEqual((rtt.srtt, rtt.rttvar), (0.1, 0.05))
        self.assertAlmostEqual(rtt.rto, 0.3)
        self.assertTrue(rtt.add_sample(0.2))
        self.assertAlmostEqual(rtt.srtt, 0.1125)
        self.assertAlmostEqual(rtt.rttvar, 0.0625)
        self.assertAlmostEqual(rtt.rto, 0.363)

    def test_third_sample(self):
        """After 100, 200 then R=40: RTTVAR 0.75*62.5 + 0.25*72.5 = 65,
        SRTT 0.875*112.5 + 0.125*40 = 103.4375, RTO ceil(363.4375) = 364."""
        rtt = RTTEstimator()
        for r in (100, 200, 40):
            rtt.add_sample_ms(r)
        self.assertAlmostEqual(rtt.rttvar, 0.065)
        self.assertAlmostEqual(rtt.srtt, 0.1034375)
        self.assertAlmostEqual(rtt.rto, 0.364)

    def test_minimum(self):
        """Loopback samples of 4 ms give ceil(4 + 8) = 12, clamped to 50 ms."""
        rtt = RTTEstimator()
        rtt.add_sample_ms(4)
        self.assertEqual(rtt.rto, 0.05)

    def test_maximum(self):
        """A 900 ms sample gives 2700 ms, clamped to 1 s."""
        rtt = RTTEstimator()
        rtt.add_sample_ms(900)
        self.assertEqual(rtt.rto, 1.0)

    def test_large_samples_ignored(self):
        """Samples of 5 s or more change nothing; 4999 ms is used."""
        rtt = RTTEstimator()
        self.assertFalse(rtt.add_sample_ms(5000))
        self.assertFalse(rtt.add_sample(65.0))
        self.assertEqual((rtt.srtt, rtt.rttvar), (1.0, 0.5))
        self.assertFalse(rtt.hit)
        self.assertTrue(rtt.add_sample_ms(4999))
        self.assertEqual(rtt.srtt, 4.999)


class LinkPair:
    """A client and a server DatagramLayer joined by explicit calls."""

    def __init__(self):
        self.client = DatagramLayer(TO_SERVER)
        self.server = DatagramLayer(TO_CLIENT)

    def to_server(self, now_sent, now_received, address=A, payload=PAYLOAD):
        wire = self.client.encode(CIPHER, payload, now_sent)
        return self.server.decode(CIPHER, wire, address, now_received)

    def to_client(self, now_sent, now_received, payload=PAYLOAD):
        wire = self.server.encode(CIPHER, payload, now_sent)
        return self.client.decode(CIPHER, wire, B, now_received)


def timestamps(wire):
    """(timestamp, timestamp_reply) of a sealed datagram."""
    return decode_plaintext(open_sealed(CIPHER, wire)[2])[:2]


class TimestampEchoTests(SynchronousTestCase):
    """A received timestamp is echoed once, within 1 s, hold-corrected."""

    def test_first_datagram_has_no_reply(self):
        """With nothing received, timestamp_reply is 0xFFFF."""
        layer = DatagramLayer(TO_SERVER)
        wire = layer.encode(CIPHER, PAYLOAD, 10.0)
        self.assertEqual(timestamps(wire), (10000, NO_TIMESTAMP))

    def test_hold_time_correction(self):
        """Held 250 ms, the echo is the peer's timestamp + 250."""
        pair = LinkPair()
        pair.to_server(10.0, 10.02)
        wire = pair.server.encode(CIPHER, PAYLOAD, 10.27)
        self.assertEqual(timestamps(wire), (10270, 10250))

    def test_echoed_once(self):
        """The second datagram after one receive carries no echo."""
        pair = LinkPair()
        pair.to_server(10.0, 10.02)
        pair.server.encode(CIPHER, PAYLOAD, 10.03)
        wire = pair.server.encode(CIPHER, PAYLOAD, 10.04)
        self.assertEqual(timestamps(wire)[1], NO_TIMESTAMP)

    def test_echo_window(self):
        """Held 999 ms it is echoed; held 1000 ms it is not."""
        pair = LinkPair()
        pair.to_server(10.0, 10.0)
        wire = pair.server.encode(CIPHER, PAYLOAD, 10.999)
        self.assertEqual(timestamps(wire)[1], 10999)
        pair.to_server(20.0, 20.0)
        wire = pair.server.encode(CIPHER, PAYLOAD, 21.0)
        self.assertEqual(timestamps(wire)[1], NO_TIMESTAMP)
        # Too old to echo, and not echoed later either.
        wire = pair.server.encode(CIPHER, PAYLOAD, 21.001)
        self.assertEqual(timestamps(wire)[1], NO_TIMESTAMP)

    def test_wraps(self):
        """Echo and RTT are computed modulo 65536 across the wrap."""
        pair = LinkPair()
        pair.to_server(65.530, 65.532)  # client timestamp 65530
        wire = pair.server.encode(CIPHER, PAYLOAD, 65.542)  # held 10 ms
        self.assertEqual(timestamps(wire)[1], 4)  # 65540 mod 65536
        pair.client.decode(CIPHER, wire, B, 65.544)  # now16 = 8
        self.assertEqual(pair.client.rtt.srtt, 0.004)

    def test_rtt_excludes_hold_time(self):
        """20 ms out, held 30 ms, 10 ms back: the client measures 30 ms."""
        pair = LinkPair()
        pair.to_server(10.0, 10.02)
        pair.to_client(10.05, 10.06)
        self.assertEqual(pair.client.rtt.srtt, 0.03)
        self.assertEqual(pair.client.rtt.rttvar, 0.015)
        # The server had nothing echoed to it: its estimator is untouched.
        self.assertFalse(pair.server.rtt.hit)

    def test_congestion_penalty(self):
        """An ECN-marked datagram's timestamp is saved 500 ms earlier."""
        client = DatagramLayer(TO_SERVER)
        server = DatagramLayer(TO_CLIENT)
        wire = client.encode(CIPHER, PAYLOAD, 10.0)
        server.decode(CIPHER, wire, A, 10.0, congestion_experienced=True)
        self.assertEqual(server.saved_timestamp, 9500)
        wire = server.encode(CIPHER, PAYLOAD, 10.01)
        self.assertEqual(timestamps(wire)[1], 9510)


class ReceiveRuleTests(SynchronousTestCase):
    """Only in-order datagrams update timing, address and last_heard."""

    def test_sequence_numbers(self):
        """Each side counts from 0; expected is highest seen + 1."""
        pair = LinkPair()
        for i in range(3):
            pair.to_server(1.0 + i, 1.0 + i)
        self.assertEqual(pair.client.next_seq, 3)
        self.assertEqual(pair.server.expected_seq, 3)
        self.assertEqual(pair.server.next_seq, 0)

    def test_old_datagram_returned_but_unused(self):
        """An older seq's payload comes back, and nothing else changes."""
        pair = LinkPair()
        old = pair.client.encode(CIPHER, b"old payload!", 1.0)
        new = pair.client.encode(CIPHER, PAYLOAD, 2.0)
        self.assertEqual(pair.server.decode(CIPHER, new, A, 2.0),
                         (PAYLOAD, True))
        saved = pair.server.saved_timestamp
        self.assertEqual(saved, 2000)
        payload, roamed = pair.server.decode(CIPHER, old, B, 2.5)
        self.assertEqual((payload, roamed), (b"old payload!", False))
        self.assertEqual(pair.server.remote_address, A)
        self.assertEqual(pair.server.expected_seq, 2)
        self.assertEqual(pair.server.last_heard, 2.0)
        self.assertEqual(pair.server.saved_timestamp, saved)

    def test_old_datagram_no_rtt_sample(self):
        """A delayed echo carried by an old seq gives no RTT sample."""
        pair = LinkPair()
        pair.to_server(1.0, 1.0)
        stale = pair.server.encode(CIPHER, PAYLOAD, 1.001)  # echoes 1001
        fresh = pair.server.encode(CIPHER, PAYLOAD, 1.002)
        pair.client.decode(CIPHER, fresh, B, 1.003)
        pair.client.decode(CIPHER, stale, B, 3.0)
        self.assertFalse(pair.client.rtt.hit)

    def test_wrong_direction(self):
        """A datagram in our own direction is WRONG_DIRECTION (reflection)."""
        server = DatagramLayer(TO_CLIENT)
        own = server.encode(CIPHER, PAYLOAD, 1.0)
        e = self.assertRaises(DatagramDropped, server.decode, CIPHER, own, A,
                              1.0)
        self.assertEqual(e.reason, DropReason.WRONG_DIRECTION)
        self.assertEqual(server.expected_seq, 0)
        self.assertIsNone(server.remote_address)

    def test_auth_failure_changes_nothing(self):
        """A forged datagram is AUTH_FAILED and leaves the state alone."""
        pair = LinkPair()
        wire = bytearray(pair.client.encode(CIPHER, PAYLOAD, 1.0))
        wire[-1] ^= 1
        e = self.assertRaises(DatagramDropped, pair.server.decode, CIPHER,
                              bytes(wire), A, 1.0)
        self.assertEqual(e.reason, DropReason.AUTH_FAILED)
        self.assertEqual(pair.server.expected_seq, 0)
        self.assertIsNone(pair.server.last_heard)

    def test_short_datagrams(self):
        """Under 24 bytes, or an authentic plaintext under 4, is SHORT."""
        server = DatagramLayer(TO_CLIENT)
        e = self.assertRaises(DatagramDropped, server.decode, CIPHER,
                              b"\0" * 23, A, 1.0)
        self.assertEqual(e.reason, DropReason.SHORT)
        wire = seal(CIPHER, TO_SERVER, 0, b"\0\0\0")
        e = self.assertRaises(DatagramDropped, server.decode, CIPHER, wire,
                              A, 1.0)
        self.assertEqual(e.reason, DropReason.SHORT)
        self.assertEqual(server.expected_seq, 0)

    def test_offset(self):
        """With an offset the layer skips a header without copying it off."""
        client = DatagramLayer(TO_SERVER)
        server = DatagramLayer(TO_CLIENT)
        wire = client.encode(CIPHER, PAYLOAD, 1.0, prefix=b"H" * 17)
        self.assertEqual(wire[:17], b"H" * 17)
        self.assertEqual(server.decode(CIPHER, wire, A, 1.0, offset=17),
                         (PAYLOAD, True))

    def test_memoryview(self):
        """A memoryview of the received bytes decodes like the bytes."""
        client = DatagramLayer(TO_SERVER)
        server = DatagramLayer(TO_CLIENT)
        wire = client.encode(CIPHER, PAYLOAD, 1.0, prefix=b"H" * 17)
        payload, roamed = server.decode(CIPHER, memoryview(wire)[17:], A, 1.0)
        self.assertEqual((bytes(payload), roamed), (PAYLOAD, True))
        bad = bytearray(wire)
        bad[20] ^= 1
        e = self.assertRaises(DatagramDropped, server.decode, CIPHER,
                              memoryview(bad), A, 1.0, offset=17)
        self.assertEqual(e.reason, DropReason.AUTH_FAILED)

    def test_reserve_seq(self):
        """Numbering resumes above a reserved mark and never goes back."""
        layer = DatagramLayer(TO_CLIENT)
        self.assertEqual(layer.reserve_seq(1000), 1000)
        self.assertEqual(layer.reserve_seq(10), 1000)
        wire = layer.encode(CIPHER, PAYLOAD, 1.0)
        self.assertEqual(open_sealed(CIPHER, wire)[:2], (TO_CLIENT, 1000))

    def test_sequence_exhausted(self):
        """The encoder refuses to go past 2**63 - 1 rather than wrap."""
        layer = DatagramLayer(TO_SERVER)
        layer.next_seq = 2**63 - 1
        layer.encode(CIPHER, PAYLOAD, 1.0)
        self.assertRaises(ValueError, layer.encode, CIPHER, PAYLOAD, 1.0)
        self.assertEqual(layer.next_seq, 2**63)

    def test_short_payload_never_sent(self):
        """The layer refuses a payload under 10 bytes and uses no seq."""
        layer = DatagramLayer(TO_SERVER)
        self.assertRaises(ValueError, layer.encode, CIPHER, b"123456789", 1.0)
        self.assertEqual(layer.next_seq, 0)

    def test_bad_direction(self):
        """Only 0 and 1 are directions."""
        self.assertRaises(ValueError, DatagramLayer, 2)

    @settings(max_examples=30, deadline=None)
    @given(st.binary(max_size=300), st.floats(0, 1e6))
    def test_encoder_payload_at_least_10(self, payload, now):
        """Every datagram the layer produces carries at least 10 bytes of
        payload; shorter payloads raise before anything is sealed."""
        layer = DatagramLayer(TO_SERVER)
        try:
            wire = layer.encode(CIPHER, payload, now)
        except ValueError:
            self.assertLess(len(payload), 10)
            return
        plaintext = open_sealed(CIPHER, wire)[2]
        self.assertGreaterEqual(len(plaintext) - 4, 10)


class RoamingTests(SynchronousTestCase):
    """mosh's roaming rule: the server follows newer authentic datagrams."""

    def test_first_datagram_attaches(self):
        """The server has no address until the first authentic datagram."""
        pair = LinkPair()
        self.assertIsNone(pair.server.remote_address)
        self.assertEqual(pair.to_server(1.0, 1.0, A), (PAYLOAD, True))
        self.assertEqual(pair.server.remote_address, A)
        self.assertEqual(pair.server.last_heard, 1.0)

    def test_same_address_no_roam(self):
        """Datagrams from the known address do not roam."""
        pair = LinkPair()
        pair.to_server(1.0, 1.0, A)
        self.assertEqual(pair.to_server(2.0, 2.0, A), (PAYLOAD, False))

    def test_newer_datagram_moves(self):
        """A newer datagram from another address moves the session there."""
        pair = LinkPair()
        pair.to_server(1.0, 1.0, A)
        self.assertEqual(pair.to_server(2.0, 2.0, C), (PAYLOAD, True))
        self.assertEqual(pair.server.remote_address, C)

    def test_replay_does_not_move(self):
        """A replayed datagram from elsewhere neither moves nor refreshes."""
        pair = LinkPair()
        first = pair.client.encode(CIPHER, PAYLOAD, 1.0)
        pair.server.decode(CIPHER, first, A, 1.0)
        pair.to_server(2.0, 2.0, A)
        payload, roamed = pair.server.decode(CIPHER, first, B, 3.0)
        self.assertFalse(roamed)
        self.assertEqual(payload, PAYLOAD)
        self.assertEqual(pair.server.remote_address, A)
        self.assertEqual(pair.server.last_heard, 2.0)

    def test_reordered_datagrams(self):
        """When seq 1 arrives before seq 0, seq 0 cannot move the session."""
        pair = LinkPair()
        zero = pair.client.encode(CIPHER, PAYLOAD, 1.0)
        one = pair.client.encode(CIPHER, PAYLOAD, 1.1)
        self.assertTrue(pair.server.decode(CIPHER, one, B, 1.2)[1])
        self.assertFalse(pair.server.decode(CIPHER, zero, A, 1.3)[1])
        self.assertEqual(pair.server.remote_address, B)

    def test_client_never_roams(self):
        """The client keeps its server address whatever the source."""
        pair = LinkPair()
        pair.to_server(1.0, 1.0)
        wire = pair.server.encode(CIPHER, PAYLOAD, 1.1)
        self.assertEqual(pair.client.decode(CIPHER, wire, C, 1.2),
                         (PAYLOAD, False))
        self.assertIsNone(pair.client.remote_address)
        self.assertEqual(pair.client.last_heard, 1.2)


class OpenTests(SynchronousTestCase):
    """DatagramLayer.open, the session's receive path, and idle memory."""

    def test_open_returns_whole_plaintext(self):
        """open() gives the timestamps and payload; decode() the payload."""
        client, server = DatagramLayer(TO_SERVER), DatagramLayer(TO_CLIENT)
        wire = client.encode(CIPHER, PAYLOAD, 10.0)
        plaintext = server.open(CIPHER, wire, A, 10.0)
        self.assertEqual(decode_plaintext(plaintext),
                         (10000, NO_TIMESTAMP, PAYLOAD))
        self.assertEqual(server.remote_address, A)

    def test_roaming_to_an_equal_address_is_no_roam(self):
        """An equal address in a new tuple object is not a roam."""
        pair = LinkPair()
        pair.to_server(1.0, 1.0, ("127.0.0.1", 5000))
        self.assertEqual(pair.to_server(2.0, 2.0, ("127.0.0.1", 5000)),
                         (PAYLOAD, False))

    def test_echo_forgets_arrival_time(self):
        """Once echoed, the saved timestamp and its arrival time are reset
        (an idle session keeps no int of its own)."""
        pair = LinkPair()
        pair.to_server(10.0, 10.02)
        self.assertEqual(pair.server.saved_timestamp_at, 10020)
        pair.server.encode(CIPHER, PAYLOAD, 10.03)
        self.assertEqual((pair.server.saved_timestamp,
                          pair.server.saved_timestamp_at), (-1, 0))

    def test_initial_rtt_shared(self):
        """Two fresh estimators share their initial floats."""
        one, two = RTTEstimator(), RTTEstimator()
        self.assertIs(one._srtt_ms, two._srtt_ms)
        self.assertIs(one._rttvar_ms, two._rttvar_ms)
        self.assertEqual((one.srtt, one.rttvar), (1.0, 0.5))


class _RaisingCipher:
    """A cipher whose encrypt fails (a broken or revoked key)."""

    def encrypt(self, nonce, plaintext, ad):
        raise RuntimeError("encrypt failed")


class _ReentrantCipher:
    """A cipher whose first encrypt first seals another datagram on the
    same layer (code that sends from within the seal)."""

    def __init__(self, layer):
        self.layer, self.inner = layer, None

    def encrypt(self, nonce, plaintext, ad):
        if self.inner is None:
            self.inner = b""
            self.inner = self.layer.encode(CIPHER, PAYLOAD, 1.0)
        return CIPHER.encrypt(nonce, plaintext, ad)


class SequenceTakenTests(SynchronousTestCase):
    """The sequence number (the nonce) is taken before the seal."""

    def test_reentrant_encrypt_gets_the_next_number(self):
        """An encrypt that seals again on the same layer: the inner and
        outer datagrams carry distinct sequence numbers."""
        layer = DatagramLayer(TO_SERVER)
        cipher = _ReentrantCipher(layer)
        outer = layer.encode(cipher, PAYLOAD, 1.0)
        seqs = [open_sealed(CIPHER, wire)[1]
                for wire in (cipher.inner, outer)]
        self.assertEqual(sorted(seqs), [0, 1])
        self.assertEqual(layer.next_seq, 2)

    def test_failed_encrypt_burns_its_number(self):
        """A failed encrypt leaves its number used: the next datagram
        takes the one after."""
        layer = DatagramLayer(TO_SERVER)
        self.assertRaises(RuntimeError, layer.encode, _RaisingCipher(),
                          PAYLOAD, 1.0)
        self.assertEqual(layer.next_seq, 1)
        wire = layer.encode(CIPHER, PAYLOAD, 1.0)
        self.assertEqual(open_sealed(CIPHER, wire)[1], 1)
