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
  one datagram no larger than that one (what does not fit is withheld, as
  loss: SSP sends it again);
* the registry's address and online flag are left as they were.
"""

from __future__ import annotations

__all__ = ["Probation", "same_address"]


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
        one datagram of at most that size may go back there (another address's
        allowance is forgotten: the session sends only to the newest; the known
        address needs none)."""
        if same_address(address, self.known):
            self.address, self.datagrams, self.budget = None, 0, 0
            return
        if address != self.address:
            self.address, self.datagrams, self.budget = address, 0, 0
        self.datagrams += 1
        self.budget += size

    def allowed(self, out) -> tuple[list, int]:
        """The datagrams of ``out`` that go to the known address or fit the
        allowance (taken from it), and how many were withheld."""
        kept = []
        known = self.known
        for data, address in out:
            if known is not None and tuple(address[:2]) == known:
                kept.append((data, address))
                continue
            size = len(data)
            if self.datagrams and size <= self.budget and address == self.address:
                self.datagrams -= 1
                self.budget -= size
                kept.append((data, address))
        return kept, len(out) - len(kept)
