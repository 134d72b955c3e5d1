"""The datagram layer: timestamps, RTT, replay rule and roaming.

Follows mosh's ``Connection`` (``src/network/network.cc``, ssp-mosh.md
sections 1.4, 1.5, 2, 3).  Plaintext = timestamp (u16 BE) | timestamp_reply
(u16 BE) | payload (one fragment).  A receiver uses a datagram for timing and
targeting only when its sequence number is at least the expected one, so a
replay can neither move the session nor skew the RTT; its payload is still
passed up, where it is harmless.
"""

import math
import struct

from cryptography.exceptions import InvalidTag

from broker.ssp.crypto import (NONCE_SIZE, OVERHEAD, SEQ_LIMIT, SEQ_MASK,
                               TO_CLIENT, TO_SERVER, aead_nonce,
                               nonce_value_from, seal)
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.fragment import FRAGMENT_HEADER_SIZE

NO_TIMESTAMP = 0xFFFF  # network.cc: uint16_t(-1) means "no timestamp"
TIMESTAMP_SIZE = 4  # two u16: network.cc Packet::Packet dos_assert
MIN_PAYLOAD = FRAGMENT_HEADER_SIZE  # mosh aborts on less (Fragment ctor)
ECHO_WINDOW = 1.0  # network.cc new_packet: echo a timestamp < 1000 ms old
CONGESTION_TIMESTAMP_PENALTY = 0.5  # network.h: 500 ms on ECN CE

_TIMESTAMPS = struct.Struct(">HH")
_ts_pack = _TIMESTAMPS.pack
_ts_unpack_from = _TIMESTAMPS.unpack_from
_PENALTY_MS = int(CONGESTION_TIMESTAMP_PENALTY * 1000)


def timestamp16(now: float) -> int:
    """mosh's 16-bit ms timestamp of ``now``; 0xFFFF becomes 0."""
    ts = int(now * 1000) & 0xFFFF
    return 0 if ts == NO_TIMESTAMP else ts


def encode_plaintext(timestamp: int, timestamp_reply: int,
                     payload: bytes) -> bytes:
    """Timestamps + payload; refuses a payload under 10 bytes (it would
    abort a mosh peer, ssp-mosh.md 1.4)."""
    if len(payload) < MIN_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes; a mosh peer "
                         f"aborts on less than {MIN_PAYLOAD}")
    return _ts_pack(timestamp, timestamp_reply) + payload


def decode_plaintext(data) -> tuple[int, int, bytes]:
    """(timestamp, timestamp_reply, payload); DatagramDropped(SHORT) under
    4 bytes."""
    if len(data) < TIMESTAMP_SIZE:
        raise DatagramDropped(DropReason.SHORT,
                              f"plaintext of {len(data)} bytes")
    timestamp, reply = _ts_unpack_from(data)
    return timestamp, reply, data[TIMESTAMP_SIZE:]


class RTTEstimator:
    """Smoothed RTT as mosh computes it (RFC 6298 style, ms internally).

    ``srtt`` and ``rttvar`` are in seconds; ``rto`` is
    ceil(SRTT + 4 RTTVAR) in whole ms, clamped to [MIN_RTO, MAX_RTO].
    """

    __slots__ = ("_srtt_ms", "_rttvar_ms", "hit")

    INITIAL_SRTT = 1.0  # network.h Connection: SRTT = 1000 ms
    INITIAL_RTTVAR = 0.5  # network.h: RTTVAR = 500 ms
    MIN_RTO = 0.05  # network.h MIN_RTO = 50 ms
    MAX_RTO = 1.0  # network.h MAX_RTO = 1000 ms
    MAX_SAMPLE = 5.0  # network.cc recv_one: ignore R >= 5000 ms (Ctrl-Z)
    ALPHA = 1 / 8  # network.cc recv_one
    BETA = 1 / 4

    def __init__(self) -> None:
        # Module constants: no two new floats per session.
        self._srtt_ms = _INITIAL_SRTT_MS
        self._rttvar_ms = _INITIAL_RTTVAR_MS
        self.hit = False

    @property
    def srtt(self) -> float:
        return self._srtt_ms / 1000

    @property
    def rttvar(self) -> float:
        return self._rttvar_ms / 1000

    @property
    def rto(self) -> float:
        # Read once or twice per datagram: a clamp without min()/max().
        rto = math.ceil(self._srtt_ms + 4 * self._rttvar_ms) / 1000
        if rto < _MIN_RTO:
            return _MIN_RTO
        return _MAX_RTO if rto > _MAX_RTO else rto

    def add_sample_ms(self, r: float) -> bool:
        """Feed one sample in ms; returns False if it was ignored (>= 5 s)."""
        if r >= self.MAX_SAMPLE * 1000:
            return False
        if not self.hit:
            self._srtt_ms = r
            self._rttvar_ms = r / 2
            self.hit = True
        else:
            self._rttvar_ms = ((1 - self.BETA) * self._rttvar_ms
                               + self.BETA * abs(self._srtt_ms - r))
            self._srtt_ms = (1 - self.ALPHA) * self._srtt_ms + self.ALPHA * r
        return True

    def restore(self, srtt: float, rttvar: float | None = None) -> None:
        """Take a saved estimate back (a parked session): ``srtt`` and
        ``rttvar`` in seconds; without ``rttvar``, ``srtt`` counts as a
        first sample (RTTVAR = SRTT/2)."""
        self._srtt_ms = srtt * 1000
        self._rttvar_ms = (srtt * 500 if rttvar is None
                           else rttvar * 1000)
        self.hit = True

    def add_sample(self, seconds: float) -> bool:
        """Feed one sample in seconds; returns False if it was ignored."""
        return self.add_sample_ms(seconds * 1000)


_INITIAL_SRTT_MS = RTTEstimator.INITIAL_SRTT * 1000
_INITIAL_RTTVAR_MS = RTTEstimator.INITIAL_RTTVAR * 1000
_MIN_RTO = RTTEstimator.MIN_RTO
_MAX_RTO = RTTEstimator.MAX_RTO


class DatagramLayer:
    """One session's link state: sequence numbers, timestamps, RTT, address.

    ``direction_out`` is TO_SERVER for a client (device) and TO_CLIENT for a
    server (broker); incoming datagrams must carry the other direction.
    Only a server roams (mosh: "only client can roam").
    """

    __slots__ = ("direction_out", "direction_in", "next_seq", "expected_seq",
                 "saved_timestamp", "saved_timestamp_at", "rtt",
                 "remote_address", "last_heard")

    def __init__(self, direction_out: int) -> None:
        if direction_out not in (TO_SERVER, TO_CLIENT):
            raise ValueError(f"direction must be 0 or 1, got {direction_out}")
        self.direction_out = direction_out
        self.direction_in = 1 - direction_out
        self.next_seq = 0  # crypto.cc Crypto::unique(): starts at 0
        self.expected_seq = 0  # network.cc expected_receiver_seq
        self.saved_timestamp = -1  # -1: nothing to echo
        self.saved_timestamp_at = 0  # local ms when it arrived
        self.rtt = RTTEstimator()
        self.remote_address = None
        self.last_heard = None

    @property
    def is_server(self) -> bool:
        return self.direction_out == TO_CLIENT

    def reserve_seq(self, floor: int) -> int:
        """Resume numbering at ``floor`` or above (a persisted high-water
        mark), so no nonce is reused after a restart; returns next_seq."""
        if floor > self.next_seq:
            self.next_seq = floor
        return self.next_seq

    def encode(self, cipher, payload: bytes, now: float,
               prefix: bytes = b"") -> bytes:
        """Seal ``payload`` (one encoded fragment) as the next datagram.

        Echoes the last in-order timestamp once, if it arrived less than
        1 s ago, corrected by the time it was held (network.cc new_packet).
        ``prefix`` is the broker framing header, if any.
        """
        if len(payload) < MIN_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes; a mosh peer "
                             f"aborts on less than {MIN_PAYLOAD}")
        now_ms = int(now * 1000)
        timestamp = now_ms & 0xFFFF
        if timestamp == NO_TIMESTAMP:
            timestamp = 0
        reply = NO_TIMESTAMP
        saved = self.saved_timestamp
        if saved >= 0:
            held = now_ms - self.saved_timestamp_at
            if held < ECHO_WINDOW * 1000:
                reply = (saved + held) & 0xFFFF
            # Echo each received timestamp at most once (and keep no int
            # for an idle session: small ints are shared).
            self.saved_timestamp = -1
            self.saved_timestamp_at = 0
        # Take the number before the seal: a cipher whose encrypt re-enters
        # and sends gets the next one, never this one (a failed encrypt
        # burns it, which is safe).
        seq = self.next_seq
        if not 0 <= seq < SEQ_LIMIT:  # refused, and no number burnt
            raise ValueError(f"sequence number {seq} outside 0..2**63-1")
        self.next_seq = seq + 1
        return seal(cipher, self.direction_out, seq,
                    _ts_pack(timestamp, reply) + payload, prefix)

    def decode(self, cipher, data: bytes, address, now: float, *,
               offset: int = 0,
               congestion_experienced: bool = False) -> tuple[bytes, bool]:
        """Open the datagram at ``data[offset:]``; return (payload, roamed).

        ``offset`` is HEADER_SIZE when a broker framing header (already
        checked) precedes the datagram.  ``roamed`` is True when a server
        adopted a new peer address (the first one too).  Raises
        DatagramDropped SHORT / AUTH_FAILED / WRONG_DIRECTION.  Timing,
        address and last_heard change only for an in-order datagram (seq >=
        expected); an older one's payload is still returned, as mosh does.
        """
        before = self.remote_address
        plaintext = self.open(cipher, data, address, now, offset,
                              congestion_experienced)
        return (plaintext[TIMESTAMP_SIZE:],
                self.remote_address is not before)

    def open(self, cipher, data, address, now: float, offset: int = 0,
             congestion_experienced: bool = False) -> bytes:
        """``decode`` returning the whole plaintext (timestamps first);
        the peer roamed if ``remote_address`` is another object after.
        ``decrypt`` then ``accept``."""
        nonce_value, plaintext = self.decrypt(cipher, data, offset)
        return self.accept(nonce_value, plaintext, address, now,
                           congestion_experienced)

    def decrypt(self, cipher, data, offset: int = 0) -> tuple[int, bytes]:
        """(nonce value, plaintext) of the datagram at ``data[offset:]``;
        changes nothing. Raises DatagramDropped SHORT / AUTH_FAILED.

        The first half of ``open`` (open_sealed() inlined): the compiled
        receive path (broker.ssp.speedups) decrypts by itself and hands a
        datagram it does not take over to ``accept``, never decrypting
        twice.
        """
        if len(data) - offset < OVERHEAD:
            raise DatagramDropped(DropReason.SHORT,
                                  f"{len(data) - offset} bytes, need at "
                                  f"least {OVERHEAD}")
        (nonce_value,) = nonce_value_from(data, offset)
        try:
            plaintext = cipher.decrypt(aead_nonce(nonce_value),
                                       data[offset + NONCE_SIZE:], None)
        except InvalidTag:
            raise DatagramDropped(DropReason.AUTH_FAILED,
                                  "packet failed integrity check") from None
        return nonce_value, plaintext

    def accept(self, nonce_value: int, plaintext: bytes, address,
               now: float, congestion_experienced: bool = False) -> bytes:
        """The second half of ``open``: take an authentic plaintext (its
        direction, sequence number, timestamps and source address) and
        return it. Raises DatagramDropped WRONG_DIRECTION / SHORT."""
        if nonce_value >> 63 != self.direction_in:
            # network.cc dos_assert: "prevent malicious playback to sender".
            raise DatagramDropped(DropReason.WRONG_DIRECTION,
                                  f"direction bit {nonce_value >> 63}")
        if len(plaintext) < TIMESTAMP_SIZE:
            raise DatagramDropped(DropReason.SHORT,
                                  f"plaintext of {len(plaintext)} bytes")
        seq = nonce_value & SEQ_MASK
        if seq < self.expected_seq:
            # Out of order or replayed: "don't use (but do return)
            # out-of-order packets for timestamp or targeting".
            return plaintext
        self.expected_seq = seq + 1
        timestamp, reply = _ts_unpack_from(plaintext)
        now_ms = int(now * 1000)
        if timestamp != NO_TIMESTAMP:
            if congestion_experienced:
                # Make the peer measure a longer RTT and slow down.
                timestamp = (timestamp - _PENALTY_MS) & 0xFFFF
            self.saved_timestamp = timestamp
            self.saved_timestamp_at = now_ms
        if reply != NO_TIMESTAMP:
            now16 = now_ms & 0xFFFF
            if now16 == NO_TIMESTAMP:
                now16 = 0
            self.rtt.add_sample_ms((now16 - reply) & 0xFFFF)
        self.last_heard = now
        if self.direction_in == TO_SERVER and address != self.remote_address:
            # Only the client roams: any authentic datagram newer than all
            # seen moves the session to its source address.
            self.remote_address = address
        return plaintext
