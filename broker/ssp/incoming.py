"""A session's incoming datagrams: open, reassemble, inflate, apply.

The hot path of the core, written out flat: one datagram, one fragment and
one small instruction is the usual case, and each call saved is measured in
bench/ssp_core.py. A datagram becomes an instruction here (header, decrypt
and timestamps in :class:`~broker.ssp.datagram.DatagramLayer`, fragments,
capped zlib, protobuf), then mosh's ``Transport::recv``: the sender learns
the peer's ack, the receiver takes the state, and the ack is scheduled (or
held until the owner confirms the state durable).

:class:`Incoming` is a mixin of ``SSPSession`` (no slots of its own), like
``broker.ssp.outgoing.Outgoing``: no extra call per datagram.

The usual datagram takes a compiled path (``broker.ssp._speedups``, bound
here as ``_fast_receive`` by :mod:`broker.ssp.speedups`) that ends in
exactly the state this code would; anything else it hands over to this
code, the reference, before it has changed anything (after its decrypt:
``_accept`` goes on from the plaintext).
"""

import struct
import zlib

from broker.ssp import events, speedups
from broker.ssp.datagram import TIMESTAMP_SIZE
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.flags import (ACKS_OVERFLOWED, CLOSED, HOLD_ACKS,
                              PEER_SHUTDOWN, SERVER)
from broker.ssp.fragment import (FINAL_BIT, FRAGMENT_HEADER_SIZE, Fragment,
                                 FragmentAssembly)
from broker.ssp.framing import HEADER_SIZE, parse_header
from broker.ssp.instruction import (DEFAULT_MAX_INFLATED, MAX_DEFLATE_RATIO,
                                    UINT64_MAX, inflate, parse_instruction)
from broker.ssp.receiver import UNCHANGED

__all__ = ["Incoming", "MAX_ACKS_WAITING"]

#: Arrival times kept per session for states whose ack waits for
#: durability; later ones are taken to have come with the last kept one.
MAX_ACKS_WAITING = 8

_fragment_header = struct.Struct(">QH").unpack_from
_FRAGMENT_END = TIMESTAMP_SIZE + FRAGMENT_HEADER_SIZE
_INFLATE_AT_ONCE = DEFAULT_MAX_INFLATED // MAX_DEFLATE_RATIO
_decompress = zlib.decompress
_state_received = events.state_received
_state_acknowledged = events.state_acknowledged
_datagram_rejected = events.datagram_rejected
#: Refusals an answering server follows with its ack (see _process).
_REMIND = frozenset((DropReason.UNKNOWN_REFERENCE, DropReason.QUEUE_FULL))
#: The compiled receive path (None: this module's code for every datagram;
#: tests set it to None to force it). It returns None when it took the
#: datagram whole (timers included), False to hand it over untouched, or
#: (nonce value, plaintext) to hand it over decrypted.
_fast_receive = speedups.fast_receive


class Incoming:
    """The receive path of ``SSPSession``."""

    __slots__ = ()

    def receive_datagram(self, data, address, now: float,
                         congestion_experienced: bool = False) -> None:
        """Take one datagram from the network; never raises for its content."""
        opened = None
        fast = _fast_receive
        if fast is not None and not congestion_experienced:
            opened = fast(self, data, address, now)
            if opened is None:
                return  # taken whole by the compiled path, timers included
        try:
            if opened:
                # Decrypted by the compiled path, which declined the rest.
                self._accept(*opened, address, now, congestion_experienced)
            else:
                self._receive(data, address, now, congestion_experienced)
        except DatagramDropped as error:
            self._emit(_datagram_rejected(error.reason))
        if not self._flags & CLOSED:
            # mosh: recalculate the timers before every wait.
            self._sender.calculate_timers(now, self._link.rtt)

    def _receive(self, data, address, now, congestion_experienced) -> None:
        """Datagram to instruction (the hot path, written out flat: one
        datagram, one fragment, one small instruction is the usual case)."""
        if self._flags & CLOSED:
            return
        header = self._header
        if header is None:
            offset = 0
        else:
            if type(data) is not bytes:
                data = bytes(data)
            if not data.startswith(header):
                parse_header(data)  # raises the precise reason
                raise DatagramDropped(DropReason.BAD_HEADER,
                                      "header names another session")
            offset = HEADER_SIZE
        nonce_value, plaintext = self._link.decrypt(
            self._ciphers.get(self._key), data, offset)
        self._accept(nonce_value, plaintext, address, now,
                     congestion_experienced)

    def _accept(self, nonce_value, plaintext, address, now,
                congestion_experienced) -> None:
        """An authentic plaintext to instruction, and on to ``_process``."""
        link = self._link
        before = link.remote_address
        expected = link.expected_seq
        plaintext = link.accept(nonce_value, plaintext, address, now,
                                congestion_experienced)
        if link.remote_address is not before and before is not None:
            # mosh's roaming rule moved the peer; its first address (of a
            # new, resumed or re-attached session) is no roam.
            self._emit(events.PeerRoamed(address))
        if len(plaintext) < _FRAGMENT_END:
            raise DatagramDropped(
                DropReason.BAD_FRAGMENT,
                f"{len(plaintext) - TIMESTAMP_SIZE} payload bytes, fragment "
                f"header needs {FRAGMENT_HEADER_SIZE}")
        fragment_id, word = _fragment_header(plaintext, TIMESTAMP_SIZE)
        if word == FINAL_BIT:
            # Fragment 0 and final: a whole instruction in one datagram.
            # Like a fragment of another id, it ends any partial assembly.
            self._assembly = None
            compressed = plaintext[_FRAGMENT_END:]
        else:
            assembly = self._assembly
            if assembly is None:
                self._assembly = assembly = FragmentAssembly(
                    self._max_assembly)
            try:
                compressed = assembly.add(Fragment(
                    fragment_id, word & 0x7FFF, word >= FINAL_BIT,
                    plaintext[_FRAGMENT_END:]))
            except DatagramDropped:
                self._assembly = None
                raise
            if compressed is None:
                return
            self._assembly = None
        if len(compressed) < _INFLATE_AT_ONCE:
            # Too short to inflate past the cap (see instruction.inflate).
            try:
                raw = _decompress(compressed)
            except zlib.error as error:
                raise DatagramDropped(DropReason.BAD_ZLIB,
                                      str(error)) from None
        else:
            raw = inflate(compressed)
        # In order: its sequence number moved the expected one. An older one
        # (reordered, or a replay of a captured datagram) is still taken, as
        # mosh does, but never answered for its own sake (see _process).
        self._process(parse_instruction(raw), now, link.expected_seq > expected)

    def _process(self, inst, now: float, in_order: bool = True) -> None:
        """mosh's Transport::recv for one complete instruction.

        ``in_order``: the datagram completing it was newer than every one
        before. Only such a datagram earns an answer that is not an ack of
        new data: a replayed one must cost the broker no datagram (wire.md
        3), and a device that really lost our ack resends with a new
        sequence number."""
        sender = self._sender
        if sender.process_acknowledgment_through(inst.ack_num):
            self._emit(_state_acknowledged(sender.front_num))
            if sender.shutdown_acknowledged:
                self._close(events.ShutdownAcknowledged())
                return
        profile = sender._profile  # (the property, without a call)
        flags = self._flags
        answering = flags & SERVER and profile.answer_heartbeats
        # What only an in-order datagram gets: an answer that carries no
        # news of its own (a repeated ack, "we hold another state").
        reminding = answering and in_order
        try:
            state = self._receiver.receive(inst, now, profile)
        except DatagramDropped as error:
            if reminding and error.reason in _REMIND:
                # The peer builds on a state we no longer hold (it missed
                # our ack, or we were restarted or parked), or keeps too
                # many states for want of our acks (a full queue): tell it
                # which one we have, or it would retry the same way forever.
                sender.set_data_ack(now)
            raise
        if state is None:
            # Duplicate or out of order: no news. But a peer resending the
            # state we acknowledged has lost our ack; mosh-server would
            # repeat it with its heartbeat, an answering server has none.
            if reminding and inst.new_num == sender.ack_num:
                sender.set_data_ack(now)
            return
        num = inst.new_num
        sender.last_heard = now  # remote_heard(): on new states only, as mosh
        wants_ack = answering or inst.diff
        if state is not UNCHANGED:
            self._emitted_num = num
            found = self._events
            if found is None:
                self._events = [_state_received(state, num)]
            else:
                found.append(_state_received(state, num))
        if num == UINT64_MAX and not flags & PEER_SHUTDOWN:
            self._flags = flags | PEER_SHUTDOWN
            self._emit(events.ShutdownRequested())
        if not flags & HOLD_ACKS or (
                state is UNCHANGED and sender.ack_num >= self._emitted_num):
            # Nothing new to make durable (or nobody asked us to wait).
            sender.ack_num = num
            if wants_ack:
                sender.set_data_ack(now)
        elif wants_ack:
            # Held until durable: remember when it came, so that its ack
            # is due ACK_DELAY after its own arrival (confirm_durable).
            waiting = self._ack_waiting
            if waiting is None:
                self._ack_waiting = [num, now]
            elif len(waiting) < MAX_ACKS_WAITING * 2:
                waiting += (num, now)
            else:
                # Not recorded: the last entry's earlier time stands for
                # this state too (its ack may come early, never late).
                self._flags |= ACKS_OVERFLOWED
