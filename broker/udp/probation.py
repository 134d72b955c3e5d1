"""A session resumed after a crash answers no unproven address with more than it got.

After a ``kill -9`` the session record's receive mark can lag behind the
device's last datagrams (table.py writes it at most every
``mark_interval``), so a datagram captured in between still authenticates
and is in order for the resumed session: a replay from anywhere, the
device's own address included (a spoofed source costs nothing).  The
session cannot tell it from the device, so until a datagram proves it is
fresh the session is on probation:

* it is *verified* only by an in-order datagram that acknowledges a state
  this process sent (numbered from ``fresh_from``, above every state number
  of earlier processes: the session's numbering starts above the stored
  reservation, which is above every number used before, and a state number
  never runs ahead of the datagram that carries it; a captured datagram
  cannot hold that acknowledgement, and none can be forged).  The source
  address proves nothing;
* until then it sends freely to the device's last known address ``known``
  (the registry's ``connection.address``: where the session would send
  anyway), and that address stays the session's own in admission (a
  replayer's address does not displace it);
* any other address gets, for each authentic in-order datagram from it,
  one datagram at most ``AMPLIFICATION_LIMIT`` times as large (QUIC's
  limit for an unvalidated address); what does not fit is withheld, as
  loss (SSP sends it again), and a *probe* goes instead: the state the
  device acknowledged under a fresh number, with a diff that asks for an
  acknowledgement (``SSPSession.probe``), small enough to fit, so that a
  device that did move proves itself within a round trip;
* the registry's address and online flag are left as they were.

A session is put on probation when its first datagram may be a replay:
after a crash (its record's mark may lag), and whenever that datagram comes
from elsewhere than the known address (endpoint.py ``_unproven``): a
datagram that never reached the broker, lost on a failing link or sent in
a session no broker heard, is above every mark a broker wrote.
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
    """What a resumed session may still send before it is verified (module docstring).

    ``known``: the device's last known address (None: none); ``fresh_from``:
    the first state number this process sends in the session.  ``address``,
    ``datagrams`` and ``budget``: the other address the session last heard
    from and the datagrams and bytes it may still send there.
    """

    __slots__ = ("known", "fresh_from", "address", "datagrams", "budget")

    def __init__(self, known, fresh_from: int) -> None:
        self.known = None if known is None else tuple(known[:2])
        self.fresh_from = fresh_from
        self.address = None
        self.datagrams = 0
        self.budget = 0

    def verified_by(self, session) -> bool:
        """Whether the in-order datagram the session just took proves the device
        is there: it acknowledges a state this process sent (its source does not)."""
        return session.acknowledged_num >= self.fresh_from

    def is_known(self, address) -> bool:
        """Whether ``address`` is the device's last known one."""
        return same_address(address, self.known)

    def earned(self, address, size: int) -> None:
        """An authentic in-order datagram of ``size`` bytes came from ``address``:
        one datagram of at most AMPLIFICATION_LIMIT times that size may go back
        there (another address's allowance is forgotten: the session sends only
        to the newest; the known address needs none)."""
        if same_address(address, self.known):
            self.address, self.datagrams, self.budget = None, 0, 0
            return
        if address != self.address:
            self.address, self.datagrams, self.budget = address, 0, 0
        self.datagrams += 1
        self.budget += size * AMPLIFICATION_LIMIT

    def owed(self) -> bool:
        """Whether the address the session last heard from has an allowance left
        (worth a probe when what the session had due did not fit)."""
        return self.address is not None and self.datagrams > 0

    def allowed(self, out) -> tuple[list, int]:
        """The datagrams of ``out`` (the fragments of one instruction) that may go:
        those to the known address, and the others only if they all fit the
        allowance together (taken from it: a part of an instruction is of no use
        to the peer); and how many were withheld."""
        known = self.known
        kept, others = [], []
        for pair in out:
            if known is not None and tuple(pair[1][:2]) == known:
                kept.append(pair)
            else:
                others.append(pair)
        if not others:
            return kept, 0
        size = sum(len(data) for data, _ in others)
        if (len(others) <= self.datagrams and size <= self.budget
                and all(address == self.address for _, address in others)):
            self.datagrams -= len(others)
            self.budget -= size
            return kept + others, 0
        return kept, len(others)
