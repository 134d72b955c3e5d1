"""Tests for broker.ssp.framing: the 17-byte broker header."""

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.crypto import CipherCache, open_sealed
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.framing import (HEADER_SIZE, BrokerFraming, build_header,
                                parse_header)
from broker.ssp.keys import derive_session_key
from tests.ssp import _wire_vectors

U64_MAX = 2**64 - 1


class HeaderTests(SynchronousTestCase):
    """build_header / parse_header follow wire.md section 1."""

    def test_vectors(self):
        """Every recorded header is built and parsed back."""
        for v in _wire_vectors.broker()["vectors"]:
            header = build_header(v["device_number"], v["session_id"])
            self.assertEqual(header.hex(), v["header_hex"])
            wire = bytes.fromhex(v["wire_hex"])
            self.assertEqual(parse_header(wire),
                             (v["device_number"], v["session_id"]))

    def test_layout(self):
        """Version byte then two big-endian u64."""
        self.assertEqual(build_header(1, U64_MAX),
                         b"\x01" + b"\0" * 7 + b"\x01" + b"\xff" * 8)
        self.assertEqual(len(build_header(5, 6)), HEADER_SIZE)

    def test_build_refuses_bad_numbers(self):
        """Zero and numbers over 64 bits cannot be framed."""
        for device, session in ((0, 1), (1, 0), (2**64, 1), (1, 2**64),
                                (-1, 1)):
            self.assertRaises(ValueError, build_header, device, session)

    def assertDropped(self, data, reason):
        e = self.assertRaises(DatagramDropped, parse_header, data)
        self.assertEqual(e.reason, reason)

    def test_empty(self):
        """An empty datagram is SHORT."""
        self.assertDropped(b"", DropReason.SHORT)

    def test_short(self):
        """A version-1 datagram under 17 bytes is SHORT."""
        self.assertDropped(build_header(1, 2)[:-1], DropReason.SHORT)

    def test_unknown_version(self):
        """Any version byte but 1 is UNKNOWN_FRAMING, whatever the length."""
        for version in (0, 2, 0x80, 0xFF):
            header = bytes([version]) + build_header(1, 2)[1:]
            self.assertDropped(header, DropReason.UNKNOWN_FRAMING)
            self.assertDropped(header[:3], DropReason.UNKNOWN_FRAMING)

    def test_zero_numbers(self):
        """A zero device number or session id is BAD_HEADER."""
        self.assertDropped(b"\x01" + b"\0" * 8 + b"\0" * 7 + b"\x01",
                           DropReason.BAD_HEADER)
        self.assertDropped(b"\x01" + b"\0" * 7 + b"\x01" + b"\0" * 8,
                           DropReason.BAD_HEADER)


class BrokerFramingTests(SynchronousTestCase):
    """BrokerFraming checks that a datagram belongs to its session."""

    def setUp(self):
        self.framing = BrokerFraming(42, 7)
        self.datagram = self.framing.header + b"mosh datagram bytes here"

    def test_own_header(self):
        """The session's own datagram passes; strip gives the mosh part."""
        self.framing.check(self.datagram)
        self.assertEqual(self.framing.strip(self.datagram),
                         b"mosh datagram bytes here")

    def test_other_session(self):
        """A header naming another session or device is BAD_HEADER."""
        for other in (BrokerFraming(42, 8), BrokerFraming(43, 7)):
            e = self.assertRaises(DatagramDropped, self.framing.check,
                                  other.header + b"x" * 30)
            self.assertEqual(e.reason, DropReason.BAD_HEADER)

    def test_malformed(self):
        """A short or wrong-version datagram gets the precise reason."""
        e = self.assertRaises(DatagramDropped, self.framing.check,
                              self.framing.header[:10])
        self.assertEqual(e.reason, DropReason.SHORT)
        e = self.assertRaises(DatagramDropped, self.framing.check,
                              b"\x02" + self.datagram[1:])
        self.assertEqual(e.reason, DropReason.UNKNOWN_FRAMING)

    def test_value_semantics(self):
        """Framings of the same numbers are equal and hash alike."""
        self.assertEqual(self.framing, BrokerFraming(42, 7))
        self.assertEqual(hash(self.framing), hash(BrokerFraming(42, 7)))
        self.assertNotEqual(self.framing, BrokerFraming(42, 9))
        self.assertIn("42", repr(self.framing))

    def test_refuses_bad_numbers(self):
        """A framing with a zero number cannot be made."""
        self.assertRaises(ValueError, BrokerFraming, 0, 7)


class HeaderBindingTests(SynchronousTestCase):
    """A changed header byte can only make authentication fail."""

    def test_every_header_byte_bound(self):
        """Changing any header byte of a recorded datagram gets it dropped."""
        data = _wire_vectors.broker()
        secret = bytes.fromhex(data["device_secret_hex"])
        cache = CipherCache()
        for v in data["vectors"]:
            wire = bytes.fromhex(v["wire_hex"])
            device, session = parse_header(wire)
            key = derive_session_key(secret, device, session)
            open_sealed(cache.get(key), wire, HEADER_SIZE)  # authentic
            for i in range(HEADER_SIZE):
                bad = bytearray(wire)
                bad[i] ^= 0x01
                bad = bytes(bad)

                def receive():
                    device, session = parse_header(bad)
                    key = derive_session_key(secret, device, session)
                    open_sealed(cache.get(key), bad, HEADER_SIZE)

                e = self.assertRaises(DatagramDropped, receive)
                self.assertIn(e.reason, (DropReason.UNKNOWN_FRAMING,
                                         DropReason.BAD_HEADER,
                                         DropReason.AUTH_FAILED))
