"""A session that may be answering a replay sends an unproven address no more than
three times what it got.

A datagram that authenticates and is in order for a session can still be a
replay of one the broker never saw:

* after a ``kill -9`` the session record's receive mark can lag behind the
  device's last datagrams (table.py writes it at most every
  ``mark_interval``), so one captured in between is above it;
* a datagram lost on its way (a failing link; a session the device started
  during an outage, which no broker heard) is above every mark, and above
  everything the session in memory has seen.

The session cannot tell such a replay from the device, so until a datagram
proves it is fresh the session is on probation:

* it is *verified* only by an in-order datagram that acknowledges a state
  the session sent after probation began (numbered from ``fresh_from``:
  above every state number sent before, by this process or an earlier one,
  since a session resumed from its record numbers above the stored
  reservation; a captured datagram cannot hold that acknowledgement, and
  none can be forged).  The source address proves nothing;
* until then it sends freely to the device's last known address ``known``
  (the registry's ``connection.address``, or the session's address before
  it roamed: where it would send anyway), and that address stays the
  session's own in admission (a replayer's address does not displace it);
* any other address may be sent, in all, at most ``AMPLIFICATION_LIMIT``
  times the bytes of the authentic in-order datagrams it sent (QUIC's limit
  for an address it has not validated, RFC 9000 8.1; counted in bytes
  only, so a lost answer can be sent again while bytes remain).  An
  instruction's fragments go all or none.  What does not fit is withheld,
  as loss (SSP sends it again), and a *probe* goes instead
  (``SSPSession.probe``): the newest state that went out, under a fresh
  number, with a diff that asks for an acknowledgement and no chaff, small
  enough to fit, so that a device that did move proves itself within a
  round trip;
* the registry's address and online flag are left as they were.

A session is put on probation (endpoint.py) when it resumes after a crash,
when its first datagram here comes from elsewhere than the known address,
and when it roams while in memory.
"""

from __future__ import annotations

__all__ = ["AMPLIFICATION_LIMIT", "Probation", "same_address"]

#: Bytes an unverified address may be sent per byte it sent (RFC 9000 8.1).
AMPLIFICATION_LIMIT = 3


def same_address(address, known) -> bool:
    """Whether a datagram's source ``address`` is the ``known`` one (host and port:
    an IPv6 address's flow and scope fields are not compared)."""
    return known is not None and tuple(address[:2]) == tuple(known[:2])


class Probation:
    """What a session may still send before it is verified (module docstring).

    ``known``: the device's last known address (None: none); ``fresh_from``:
    the first state number sent since probation began; ``roamed``: whether a
    roam of the session in memory began it (a roam to count once verified).
    ``address`` and ``budget``: the other address the session last heard
    from and the bytes it may still send there.  ``went_out``: the number of
    the newest state that was sent anywhere (0: none yet), which a probe must
    not go back behind.
    """

    __slots__ = ("known", "fresh_from", "roamed", "address", "budget", "went_out")

    def __init__(self, known, fresh_from: int, roamed: bool = False) -> None:
        self.known = None if known is None else tuple(known[:2])
        self.fresh_from = fresh_from
        self.roamed = roamed
        self.address = None
        self.budget = 0
        self.went_out = 0

    def verified_by(self, session) -> bool:
        """Whether the in-order datagram the session just took proves the device
        is there: it acknowledges a state sent since probation began (its source
        does not)."""
        return session.acknowledged_num >= self.fresh_from

    def is_known(self, address) -> bool:
        """Whether ``address`` is the device's last known one."""
        return same_address(address, self.known)

    def earned(self, address, size: int) -> None:
        """An authentic in-order datagram of ``size`` bytes came from ``address``:
        AMPLIFICATION_LIMIT times that many bytes may go back there (another
        address's allowance is forgotten: the session sends only to the newest;
        the known address needs none)."""
        if same_address(address, self.known):
            self.address, self.budget = None, 0
            return
        if address != self.address:
            self.address, self.budget = address, 0
        self.budget += size * AMPLIFICATION_LIMIT

    def owed(self) -> bool:
        """Whether the address the session last heard from has bytes left (worth a
        probe when what the session had due did not fit)."""
        return self.address is not None and self.budget > 0

    def allowed(self, out, sent_num: int) -> tuple[list, int]:
        """The datagrams of ``out`` (the fragments of one instruction, of state
        number ``sent_num``) that may go: those to the known address, and the
        others only if they all fit the allowance together (taken from it: a
        part of an instruction is of no use to the peer); and how many were
        withheld.  Whatever goes records ``sent_num`` in ``went_out``."""
        known = self.known
        kept, others = [], []
        for pair in out:
            if known is not None and tuple(pair[1][:2]) == known:
                kept.append(pair)
            else:
                others.append(pair)
        withheld = 0
        if others:
            size = sum(len(data) for data, _ in others)
            if size <= self.budget and all(address == self.address
                                           for _, address in others):
                self.budget -= size
                kept += others
            else:
                withheld = len(others)
        if kept and sent_num > self.went_out:
            self.went_out = sent_num
        return kept, withheld
