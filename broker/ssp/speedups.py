"""The compiled receive and send paths, if built (``broker.ssp._speedups``).

``SSPSession.receive_datagram`` calls ``fast_receive`` (through
``broker.ssp.incoming._fast_receive``) for each datagram: a C function that
takes the usual datagram (one fragment, a small diff of values and events,
in order, from the known address) whole, and hands anything else over to
the Python code, the reference, before changing anything. It ends every
datagram it takes in exactly the state the Python code would
(tests/ssp/test_speedups.py).

``broker.ssp.instruction.deflate`` deflates a short instruction (any
sender's, the node's too) with the extension's ``deflate``: zlib's bytes,
nearly always computed without zlib (_speedups_deflate.c: a fixed or stored
block, where zlib would write one), else from one zlib stream kept and
reset, not one set up for each.

``SSPSession.datagrams_to_send`` calls ``fast_send`` (through
``broker.ssp.session._fast_send``): the broker's usual send, an empty ack
or heartbeat from a sender with nothing new to send (earlier empty acks may
still be unacknowledged), and a node's usual one, a new state with a small
diff (Sender.tick's choice, ``DeviceState.diff_from`` called from C), in C
(protobuf, deflate, fragment header, timestamps, seal); anything else (a
retransmission, a shutdown, a large diff, ...) it hands over (returns None)
before changing anything (tests/ssp/test_speedups_send.py).

``CompiledDeadlineQueue`` is broker.deadlines.DeadlineQueue in C: the heap
of wake-up times of broker.scheduler (tests/test_deadlines.py).

The extension (broker/ssp/_speedups*.c, one file per part: see
_speedups.h) is optional (setup.py builds it where a compiler is found);
without it, or with ``SSP_BROKER_PURE_PYTHON`` set to a non-empty value,
``fast_receive`` and ``fast_send`` are None and ``unavailable_reason``
says why. The C code
imports no broker module: it is given here, once, every Python object it
uses (classes, for their slots; constants; the functions it calls).
"""

import os
import zlib
from collections import OrderedDict

from cryptography.exceptions import InvalidTag

from broker.ssp import events, flags
from broker.ssp.bounds import _ARRAY_HEAD_GROWTH, StateBounds
from broker.ssp.crypto import OVERHEAD, CipherCache, install_cipher_class
from broker.ssp.datagram import NO_TIMESTAMP, DatagramLayer, RTTEstimator
from broker.ssp.device_state import (_EMPTY_MAP, _NO_VALUES, MAX_DEPTH,
                                     DeviceState, install_compiled_with_numbers)
from broker.ssp.errors import DropReason
from broker.ssp.fragment import FINAL_BIT
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.datagram import ECHO_WINDOW
from broker.ssp.instruction import (DEFAULT_MAX_INFLATED, MAX_DEFLATE_RATIO,
                                    PROTOCOL_VERSION, SMALL_INSTRUCTION,
                                    Instruction, deflate, install_compiled_deflate)
from broker.ssp.outgoing import _SMALLEST_PAYLOAD, SEQ_RESERVATION_BLOCK
from broker.ssp.profile import Profile
from broker.ssp.randomness import BufferedRandom
from broker.ssp.receiver import Receiver
from broker.ssp.sender import (NEVER, PROSPECTIVE_RESEND_LIMIT,
                               PROSPECTIVE_RESEND_SLACK, Sender, make_chaff)

__all__ = ["fast_receive", "fast_send", "fast_timers", "fast_set_state",
           "cipher_library",
           "fast_values_patch", "fast_state_record", "fast_next_wakeup",
           "CompiledDeadlineQueue",
           "unavailable_reason", "counts",
           "send_counts"]

#: Set to a non-empty value, the broker runs the Python receive path only.
PURE_PYTHON_VARIABLE = "SSP_BROKER_PURE_PYTHON"

#: What broker.ssp.incoming holds back for itself (MAX_ACKS_WAITING, the
#: arrival list of held acks): the same figure, kept in step by a test.
_MAX_ACKS_WAITING = 8


def _session_class():
    """SSPSession, given to the C code on its first receive: the session
    module imports this one (through incoming), so it cannot be imported
    here at import time."""
    from broker.ssp.session import SSPSession
    return SSPSession


def _load():
    """(the receive entry point, the send entry point, None) or (None,
    None, why not)."""
    if os.environ.get(PURE_PYTHON_VARIABLE):
        return None, None, f"{PURE_PYTHON_VARIABLE} is set"
    try:
        from broker.ssp import _speedups
    except ImportError as error:
        return None, None, f"broker.ssp._speedups is not built ({error})"
    _speedups.setup(
        session_class=_session_class,
        link_class=DatagramLayer, rtt_class=RTTEstimator,
        sender_class=Sender, receiver_class=Receiver,
        state_class=DeviceState, profile_class=Profile,
        bounds_class=StateBounds,
        cipher_cache_class=CipherCache, ordered_dict_class=OrderedDict,
        buffered_random_class=BufferedRandom,
        invalid_tag=InvalidTag,
        decompress=zlib.decompress,
        state_received_class=events.StateReceived,
        state_acknowledged_class=events.StateAcknowledged,
        datagram_rejected=events.datagram_rejected,
        auth_failed=DropReason.AUTH_FAILED,
        no_values=_NO_VALUES, empty_map=_EMPTY_MAP, never=NEVER,
        max_depth=MAX_DEPTH, array_head_growth=_ARRAY_HEAD_GROWTH,
        header_size=HEADER_SIZE, overhead=OVERHEAD, no_timestamp=NO_TIMESTAMP, final_bit=FINAL_BIT,
        inflate_at_once=DEFAULT_MAX_INFLATED // MAX_DEFLATE_RATIO,
        protocol_version=PROTOCOL_VERSION,
        max_acks_waiting=_MAX_ACKS_WAITING,
        closed=flags.CLOSED, server=flags.SERVER,
        hold_acks=flags.HOLD_ACKS, acks_overflowed=flags.ACKS_OVERFLOWED,
        alpha=RTTEstimator.ALPHA, beta=RTTEstimator.BETA,
        max_sample_ms=RTTEstimator.MAX_SAMPLE * 1000,
        min_rto=RTTEstimator.MIN_RTO, max_rto=RTTEstimator.MAX_RTO,
        make_chaff=make_chaff, deflate=deflate, instruction_class=Instruction,
        asks_acks=flags.ASKS_ACKS, seq_requested=flags.SEQ_REQUESTED,
        seq_reservation_block=SEQ_RESERVATION_BLOCK,
        small_instruction=SMALL_INSTRUCTION,
        smallest_payload_plain=_SMALLEST_PAYLOAD[0],
        smallest_payload_framed=_SMALLEST_PAYLOAD[HEADER_SIZE],
        echo_window_ms=ECHO_WINDOW * 1000,
        prospective_resend_slack=PROSPECTIVE_RESEND_SLACK,
        prospective_resend_limit=PROSPECTIVE_RESEND_LIMIT)
    # Every short instruction (the node's states too) from the kept stream.
    install_compiled_deflate(_speedups.deflate)
    # Every cipher keyed once, where OpenSSL was linked.
    global cipher_library
    if _speedups.HAVE_OPENSSL:
        install_cipher_class(_speedups.OCBCipher)
        cipher_library = "openssl"
    return _speedups.receive, _speedups.send, None


#: Who seals and opens datagrams: "openssl" (the extension's OCBCipher,
#: installed by _load) or "cryptography" (its AESOCB3).
cipher_library = "cryptography"
fast_receive, fast_send, unavailable_reason = _load()

#: ``fast_timers(sender, now, rtt)``: ``sender.calculate_timers(now, rtt)``
#: computed in C (the receive and send paths' own code), or by the method
#: where C cannot say exactly; None without the extension.
fast_timers = None
#: broker.deadlines.DeadlineQueue's compiled twin (broker.scheduler's heap);
#: None without the extension.
CompiledDeadlineQueue = None
#: ``fast_set_state(sender, state, now)``: ``sender.set_current_state(state,
#: now)`` with its state comparisons in C; None without the extension.
fast_set_state = None
#: ``fast_values_patch(old, new)``: broker.udp.convert.reported_patch for
#: scalar values, None where the Python code must make it; and
#: ``fast_state_record(state)``: its encode_state for a state holding no
#: events. Both None without the extension.
fast_values_patch = fast_state_record = None
#: ``fast_next_wakeup(session)``: ``SSPSession.next_wakeup()`` in C, or
#: NotImplemented where the method's own code must say; None without the
#: extension.
fast_next_wakeup = None
if fast_send is not None:
    from broker.ssp import _speedups
    fast_timers = _speedups.timers
    fast_set_state = _speedups.set_state
    fast_values_patch = _speedups.values_patch
    fast_state_record = _speedups.state_record
    fast_next_wakeup = _speedups.next_wakeup
    install_compiled_with_numbers(_speedups.with_numbers)
    CompiledDeadlineQueue = _speedups.DeadlineQueue
    del _speedups


def counts() -> tuple[int, int]:
    """(taken, handed over): datagrams the compiled path took whole and
    handed to the Python code since import; (0, 0) without it."""
    if fast_receive is None:
        return (0, 0)
    from broker.ssp import _speedups
    return _speedups.counts()


def send_counts() -> tuple[int, int]:
    """(taken, handed over): ``datagrams_to_send`` calls the compiled path
    answered whole and handed to the Python code since import; (0, 0)
    without it."""
    if fast_send is None:
        return (0, 0)
    from broker.ssp import _speedups
    return _speedups.send_counts()
