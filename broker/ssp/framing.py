"""The broker's 17-byte cleartext header (wire.md section 1).

mosh datagrams carry no session identifier (mosh uses a port per session);
the broker serves a fleet on one port, so every datagram both ways starts
with: framing version (1 byte), device number (u64 BE), session id (u64 BE).
The header is not covered by OCB's tag; it is bound to the session through
the key derivation (``broker.ssp.keys.derive_session_key``).
"""

import struct

from broker.ssp.errors import DatagramDropped, DropReason

FRAMING_VERSION = 1  # wire.md section 1
HEADER_SIZE = 17  # 1 + 8 + 8
UINT64_MAX = 2**64 - 1

#: The low bit of a session id: set when the device started this session
#: without rebooting, so that its events go on from its earlier session's,
#: clear in the first session of a boot (events numbered from 0 again).
#: Carried events that start at index 0 are otherwise ambiguous: a boot's,
#: or a session's whose events were never acknowledged (docs/protocol.md 5).
CONTINUES_BOOT = 1

_HEADER = struct.Struct(">BQQ")
assert _HEADER.size == HEADER_SIZE


def build_header(device_number: int, session_id: int) -> bytes:
    """The 17 header bytes for one session (build once, reuse per datagram)."""
    if not 0 < device_number <= UINT64_MAX:
        raise ValueError(f"device_number must be a non-zero u64, "
                         f"got {device_number}")
    if not 0 < session_id <= UINT64_MAX:
        raise ValueError(f"session_id must be a non-zero u64, "
                         f"got {session_id}")
    return _HEADER.pack(FRAMING_VERSION, device_number, session_id)


def parse_header(data) -> tuple[int, int]:
    """Return (device_number, session_id) from the start of a datagram.

    Raises DatagramDropped: SHORT (empty or under 17 bytes),
    UNKNOWN_FRAMING (version byte not 1), BAD_HEADER (a zero number).
    """
    if not data:
        raise DatagramDropped(DropReason.SHORT, "empty datagram")
    if data[0] != FRAMING_VERSION:
        # Checked before the length so another version's datagrams are
        # counted as what they are.
        raise DatagramDropped(DropReason.UNKNOWN_FRAMING,
                              f"framing version {data[0]}")
    if len(data) < HEADER_SIZE:
        raise DatagramDropped(DropReason.SHORT,
                              f"{len(data)} bytes, header needs {HEADER_SIZE}")
    _, device_number, session_id = _HEADER.unpack_from(data)
    if device_number == 0 or session_id == 0:
        raise DatagramDropped(DropReason.BAD_HEADER,
                              "device number and session id must be non-zero")
    return device_number, session_id


def continues_boot(session_id: int) -> bool:
    """The device started this session without rebooting (CONTINUES_BOOT)."""
    return bool(session_id & CONTINUES_BOOT)


#: the low half of a session id but the boot bit: the same in every session
#: of one boot of a device (broker.node.session_ids).
_BOOT_MASK = 0xFFFFFFFF & ~CONTINUES_BOOT


def boot_of(session_id: int) -> int:
    """The name of the device's boot that started this session."""
    return session_id & _BOOT_MASK


def same_boot(earlier: int | None, session_id: int) -> bool:
    """Whether ``session_id`` continues the boot of the ``earlier`` session: it
    says it did not reboot, and names that session's boot. Events it carries
    from index 0 are then that boot's, some perhaps stored already; otherwise
    (its boot's first session never heard) they are all new."""
    return (earlier is not None and continues_boot(session_id)
            and boot_of(earlier) == boot_of(session_id))


class BrokerFraming:
    """One session's header: built once, prefixed to every datagram sent."""

    __slots__ = ("device_number", "session_id", "header")

    def __init__(self, device_number: int, session_id: int) -> None:
        self.header = build_header(device_number, session_id)
        self.device_number = device_number
        self.session_id = session_id

    def __repr__(self) -> str:
        return (f"BrokerFraming(device_number={self.device_number}, "
                f"session_id={self.session_id})")

    def __eq__(self, other):
        if not isinstance(other, BrokerFraming):
            return NotImplemented
        return self.header == other.header

    def __hash__(self) -> int:
        return hash(self.header)

    def check(self, data: bytes) -> None:
        """Make sure ``data`` starts with this session's header.

        Raises DatagramDropped like parse_header, or BAD_HEADER when the
        header names another device or session.  The mosh datagram then
        starts at offset HEADER_SIZE.
        """
        if not data.startswith(self.header):
            parse_header(data)  # raises the precise reason if malformed
            raise DatagramDropped(DropReason.BAD_HEADER,
                                  "header names another session")

    def strip(self, data: bytes) -> bytes:
        """The mosh datagram after this session's header (a copy); see
        check() for the errors."""
        self.check(data)
        return data[HEADER_SIZE:]
