"""A session's outgoing datagrams: fragment, seal, stay within the reservation.

One instruction becomes datagrams here: cut into fragments sized for the
peer's address family and the framing (ssp-mosh.md 5.1), each sealed with
the next sequence number. With the broker framing a sequence number is used
only below the persisted reservation (wire.md section 7: a restart never
reuses a nonce); the session asks its owner for more in time with
:class:`~broker.ssp.events.SequenceReservationRequested`.

:class:`Outgoing` is a mixin of ``SSPSession`` (its own slots), like
``broker.ssp.parking.Parking``: no extra call per datagram.
"""

import struct

from broker.ssp import events
from broker.ssp.flags import SEQ_REQUESTED
from broker.ssp.fragment import FINAL_BIT, MAX_FRAGMENTS, Fragment
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import (MTU_IPV4, MTU_IPV6, encode_instruction,
                                    fragment_payload_size)

__all__ = ["Outgoing", "SEQ_RESERVATION_BLOCK", "SEQ_REQUESTED"]

#: Sequence numbers reserved per persisted reservation (one durable write
#: per this many datagrams of a session).
SEQ_RESERVATION_BLOCK = 4096


_fragment_header = struct.Struct(">QH").pack
_PAYLOAD_IPV4 = {0: fragment_payload_size(MTU_IPV4, 0),
                 HEADER_SIZE: fragment_payload_size(MTU_IPV4, HEADER_SIZE)}
_PAYLOAD_IPV6 = {0: fragment_payload_size(MTU_IPV6, 0),
                 HEADER_SIZE: fragment_payload_size(MTU_IPV6, HEADER_SIZE)}
_SMALLEST_PAYLOAD = {size: min(_PAYLOAD_IPV4[size], _PAYLOAD_IPV6[size])
                     for size in _PAYLOAD_IPV4}


def _payload_size(address, header_size: int) -> int:
    """Fragment payload for the peer's address family (ssp-mosh.md 5.1)."""
    host = address[0] if type(address) is tuple and address else address
    if isinstance(host, str) and ":" in host:
        return _PAYLOAD_IPV6[header_size]
    return _PAYLOAD_IPV4[header_size]


class Outgoing:
    """The send path and the sequence reservation of ``SSPSession``."""

    __slots__ = ()

    @property
    def seq_reservation(self) -> int | None:
        """The confirmed reservation: numbers below it may be used."""
        return self._seq_reserved

    def confirm_seq_reservation(self, limit: int) -> None:
        """The owner persisted the reservation ``limit``."""
        if self._seq_reserved is not None and limit > self._seq_reserved:
            self._seq_reserved = limit
            self._flags &= ~SEQ_REQUESTED

    def _request_seqs(self) -> None:
        if not self._flags & SEQ_REQUESTED:
            self._flags |= SEQ_REQUESTED
            limit = (max(self._seq_reserved, self._link.next_seq)
                     + SEQ_RESERVATION_BLOCK)
            self._emit(events.SequenceReservationRequested(limit))

    def _send_instruction(self, inst, address, now: float) -> list:
        compressed = encode_instruction(inst)
        header = self._header
        header_size = HEADER_SIZE if header else 0
        if len(compressed) <= _SMALLEST_PAYLOAD[header_size]:
            count = 1  # one fragment, whatever the address family
        else:
            size = _payload_size(address, header_size)
            count = -(-len(compressed) // size)
            if count > MAX_FRAGMENTS:
                # A mosh peer aborts on fragment numbers of 15 bits or more.
                raise ValueError(f"instruction needs {count} fragments; "
                                 "states must diff to under "
                                 f"{MAX_FRAGMENTS * size} compressed bytes")
        link = self._link
        reserved = self._seq_reserved
        if reserved is not None:
            if link.next_seq + count > reserved:
                # Not covered by a durable reservation: treat it as lost
                # (the sender retransmits) rather than risk a nonce. Burn
                # one number (below the reservation, unsent) so that state
                # numbers stay within sequence numbers + 1 (Resumption).
                link.reserve_seq(link.next_seq + 1)
                self._request_seqs()
                return []
            if reserved - (link.next_seq + count) < SEQ_RESERVATION_BLOCK // 2:
                self._request_seqs()
        # Instruction ids only need to differ from the previous one; the
        # sequence number of the first fragment is unique and increasing,
        # also across restarts and without keeping a Fragmenter.
        fragment_id = link.next_seq + 1
        cipher = self._ciphers.get(self._key)
        prefix = header or b""
        if count == 1:
            # The usual case, Fragment(fragment_id, 0, True, compressed)
            # .encode() written out.
            payload = _fragment_header(fragment_id, FINAL_BIT) + compressed
            return [(link.encode(cipher, payload, now, prefix), address)]
        out = []
        last = count - 1
        for number in range(count):
            payload = Fragment(fragment_id, number, number == last,
                               compressed[number * size:(number + 1) * size]
                               ).encode()
            out.append((link.encode(cipher, payload, now, prefix), address))
        return out
