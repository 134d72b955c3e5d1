"""The receiving half of SSP: which remote states we hold and which is newest.

mosh's ``Transport::recv`` (``src/network/networktransport-impl.h``,
ssp-mosh.md section 8), pure. An instruction says "state ``new_num`` is
state ``old_num`` plus ``diff``"; it is applied only to a state we still
hold, so duplicates, replays and reordering are harmless, and only a state
newer than every one held moves the acknowledgement forward.

Where mosh aborts (a throwaway number above every state held) or would keep
growing, we refuse the instruction with :class:`DatagramDropped` and change
nothing. The held states are one flat list (num, state, num, state, ...),
sorted by number, so an idle session holds one small list and no tuples.
"""

import math

from broker.ssp.errors import DatagramDropped, DropReason

__all__ = ["Receiver", "ResumedReceiver", "UNCHANGED"]

_NUM, _STATE, _STRIDE = 0, 1, 2
_NO_QUENCH = -math.inf


class _Unchanged:
    """Returned for a new newest state equal to the previous newest."""

    __slots__ = ()

    def __repr__(self):
        return "UNCHANGED"


#: ``Receiver.receive`` result: a new newest state number, same state
#: (e.g. an empty ack or heartbeat), so there is nothing new to report.
UNCHANGED = _Unchanged()


class Receiver:
    """The remote states one session holds.

    ``zero`` is given with the broker framing: there ``old_num = 0`` always
    means "from the empty state", even after we dropped our copy of state 0
    (wire.md section 4), so a peer that lost its place can resend
    everything without a new session.
    """

    __slots__ = ("_states", "_quench_until", "_zero", "_held_events")

    _tracks_accepted = False  # call _accepted() (a subclass hook)?

    def __init__(self, state, num: int = 0, *, zero=None) -> None:
        self._states = [num, state]
        self._quench_until = _NO_QUENCH
        self._zero = zero
        #: bounded profiles: StateBounds.check's bound of the newest state's events
        self._held_events = None

    @property
    def newest_num(self) -> int:
        """Number of the newest state received in order."""
        return self._states[-_STRIDE + _NUM]

    @property
    def newest_state(self):
        """The newest state received in order."""
        return self._states[-_STRIDE + _STATE]

    @property
    def oldest_num(self) -> int:
        return self._states[_NUM]

    @property
    def count(self) -> int:
        """How many remote states are held."""
        return len(self._states) // _STRIDE

    @property
    def nums(self) -> list:
        """The numbers of the states held, in order (for tests and logs)."""
        return self._states[_NUM::_STRIDE]

    def receive(self, inst, now: float, profile):
        """Take one complete instruction; return the new newest state,
        UNCHANGED, or None.

        UNCHANGED: a new newest number for the same state as the previous
        newest (an empty diff from it). None means nothing new: a duplicate
        (its number is held already) or a state kept out of order (older
        than the newest). Raises
        DatagramDropped (and changes nothing) for an unknown reference, a
        throwaway number above every state held, a full queue during the
        quench time, a diff the state refuses (BAD_DIFF), or one that
        passes the profile's ``state_bounds`` (broker.ssp.bounds).
        """
        states = self._states
        size = len(states)
        newest_num = states[size - _STRIDE + _NUM]
        new_num = inst.new_num
        old_num = inst.old_num
        reference = None
        borrowed = False  # the reference is not in the list
        if new_num > newest_num:
            # The usual case: a new newest state (so not a duplicate: the
            # list is sorted), mostly from the newest one held.
            if old_num == newest_num:
                reference = states[size - _STRIDE + _STATE]
            else:
                for index in range(_NUM, size, _STRIDE):
                    if states[index] == old_num:
                        reference = states[index + 1]
                        break
        else:
            for index in range(_NUM, size, _STRIDE):
                num = states[index]
                if num == new_num:
                    return None  # duplicate: we already have this state
                if num == old_num:
                    reference = states[index + 1]
        if reference is None:
            if old_num == 0 and self._zero is not None:
                reference = self._zero
            else:
                reference = self._alias(old_num, inst.throwaway_num)
            if reference is None:
                # Security-sensitive: a diff applies only to a state we
                # hold; this is how idempotency is enforced.
                raise DatagramDropped(
                    DropReason.UNKNOWN_REFERENCE,
                    f"state {old_num} is not held (newest {newest_num})")
            borrowed = True
        throwaway = inst.throwaway_num
        if throwaway > newest_num and not borrowed:
            # mosh would erase every state and abort. (A diff from a state
            # not in the list, the empty one or a resumed alias, may come
            # from a sender whose front we lost: it becomes the only state.)
            raise DatagramDropped(
                DropReason.BAD_THROWAWAY,
                f"throwaway {throwaway} above every state held "
                f"(newest {newest_num})")
        keep_from = 0
        while keep_from < size and states[keep_from] < throwaway:
            keep_from += _STRIDE
        quench = evict = False
        if (size - keep_from) // _STRIDE > profile.received_states_cap:
            if profile.state_bounds is not None and new_num > newest_num:
                # Bounded (broker.ssp.bounds): a new newest state takes the
                # place of the oldest one above the throwaway state, so the
                # states stay within the cap and the newest still gets in.
                evict = True
            elif now < self._quench_until or profile.state_bounds is not None:
                # Rather than drop states from the middle (and maybe one we
                # acknowledged), refuse to grow: a malicious sender or long
                # one-way connectivity.
                raise DatagramDropped(
                    DropReason.QUEUE_FULL,
                    f"{size // _STRIDE} states held, refusing {new_num}")
            else:
                quench = True
        new_state = reference
        diff = inst.diff
        if diff:
            bounds = profile.state_bounds
            if bounds is not None:
                bounds.check_diff(diff)
            try:
                new_state = reference.apply(diff)
            except (ValueError, TypeError) as error:
                # The contract says BAD_DIFF; a state type that slips must
                # still not let a peer crash us.
                raise DatagramDropped(DropReason.BAD_DIFF,
                                      str(error)) from None
            if bounds is not None and new_state is not reference:
                # What it holds beside the oldest state kept (its events
                # from there on, after subtract below): broker.ssp.bounds.
                self._held_events = bounds.check(
                    new_state, reference,
                    states[keep_from + _STATE] if keep_from < size else None,
                    len(diff), self._held_events)
        # Nothing has changed so far; from here on the instruction counts.
        if quench:
            self._quench_until = now + profile.quench_time
        newest = states[-1]
        if (new_state is reference and reference is not newest
                and new_num > newest_num and reference == newest):
            # An empty diff from an older state equal to the newest (the
            # peer set a value back and sends from its acknowledged state):
            # the newest state again, nothing new to report. (A non-empty
            # diff is not compared: that would cost every datagram of a
            # peer streaming from its front.)
            new_state = newest
        unchanged = new_state is newest
        # Lists are rebuilt at their exact size rather than resized: an idle
        # session keeps them.
        if keep_from == size:
            self._states = [new_num, new_state]
            if self._tracks_accepted:
                self._accepted(new_num)
            return new_state
        if keep_from:
            self._states = states = states[keep_from:]
            self._rationalize()
        checked = new_state
        new_state = new_state.subtract(states[_STATE])
        held = self._held_events
        if held is not None and held[0] is checked:
            # Fewer events, the same bound: kept for the diff built on it.
            self._held_events = (new_state, held[1], held[2])
        if new_num > newest_num:
            if evict:
                # (The peer builds on its newest states or on the throwaway
                # one; a diff from the forgotten one is answered with our ack.)
                states = states[:_STRIDE] + states[2 * _STRIDE:]
            self._states = states + [new_num, new_state]
            if self._tracks_accepted:
                self._accepted(new_num)
            return UNCHANGED if unchanged else new_state
        index = 0
        while states[index] < new_num:
            index += _STRIDE
        self._states = states[:index] + [new_num, new_state] + states[index:]
        return None

    def _alias(self, old_num: int, throwaway_num: int):
        """A state to use for an unknown ``old_num``, or None (see
        ResumedReceiver)."""
        return None

    def _accepted(self, num: int) -> None:
        """A new newest state ``num`` was accepted."""

    def _rationalize(self) -> None:
        """Forget in every held state what the oldest one holds (mosh does
        this in ``get_remote_diff``); frees acknowledged events."""
        states = self._states
        oldest = states[_STATE]
        for index in range(_STATE, len(states), _STRIDE):
            states[index] = states[index].subtract(oldest)


class ResumedReceiver(Receiver):
    """The receiver of a session resumed after a broker restart, with
    acknowledgements held until durable (``ack_requires_confirm``).

    The persisted state ``num`` is the newest one made durable. Before the
    restart we may have acknowledged newer states without persisting them,
    but only states equal to it (heartbeats, acknowledged as "unchanged").
    The peer, whose acknowledged front is such a state, sends diffs from it
    (old_num = throwaway_num = its front); we no longer hold it, so we
    apply them to the persisted state, which has the same content. Only
    for numbers between the persisted one and the first state accepted
    after the restart: later ones are states we really hold or held.
    """

    __slots__ = ("_resumed_num", "_resumed_state", "_alias_below")

    _tracks_accepted = True

    def __init__(self, state, num: int, *, zero=None) -> None:
        super().__init__(state, num, zero=zero)
        self._resumed_num = num
        self._resumed_state = state
        self._alias_below = math.inf

    def _alias(self, old_num: int, throwaway_num: int):
        if (old_num == throwaway_num
                and self._resumed_num < old_num < self._alias_below):
            return self._resumed_state
        return None

    def _accepted(self, num: int) -> None:
        if self._alias_below == math.inf:
            self._alias_below = num
