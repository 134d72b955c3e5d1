"""Tests for broker.ssp.keys: mosh's key text and the session key KDF."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.keys import derive_session_key, format_key, parse_key
from tests.ssp import _wire_vectors

MOSH_KEY_TEXT = "oEUFMMF5Ff625SzDBLCIGQ"
MOSH_KEY = bytes.fromhex("a0450530c17915feb6e52cc304b08819")


class ParseKeyTests(SynchronousTestCase):
    """parse_key applies mosh's strict 22-character rule."""

    def test_mosh_key(self):
        """The key of the recorded mosh session parses to its 16 bytes."""
        self.assertEqual(parse_key(MOSH_KEY_TEXT), MOSH_KEY)

    def test_21_characters(self):
        """A key one character short is refused, naming the length."""
        e = self.assertRaises(ValueError, parse_key, MOSH_KEY_TEXT[:-1])
        self.assertIn("22 characters", str(e))
        self.assertIn("got 21", str(e))

    def test_23_characters(self):
        """A key one character long is refused, naming the length."""
        e = self.assertRaises(ValueError, parse_key, MOSH_KEY_TEXT + "A")
        self.assertIn("got 23", str(e))

    def test_padding(self):
        """The padded 24-character form is refused with a word on padding."""
        e = self.assertRaises(ValueError, parse_key, MOSH_KEY_TEXT + "==")
        self.assertIn("padding", str(e))

    def test_bad_characters(self):
        """URL-safe, space and non-ASCII characters are refused by position."""
        for bad in ("-", "_", " ", "é", "\n", "."):
            text = MOSH_KEY_TEXT[:5] + bad + MOSH_KEY_TEXT[6:]
            e = self.assertRaises(ValueError, parse_key, text)
            self.assertIn("position 5", str(e))

    def test_last_character_low_bits(self):
        """A last character with non-zero low 4 bits is not canonical."""
        for last in "BCDHPRf/":
            e = self.assertRaises(ValueError, parse_key,
                                  MOSH_KEY_TEXT[:-1] + last)
            self.assertIn("canonical", str(e))

    def test_last_character_canonical(self):
        """Each last character whose low 4 bits are zero is accepted."""
        for last in "AQgw":
            key = parse_key(MOSH_KEY_TEXT[:-1] + last)
            self.assertEqual(len(key), 16)

    def test_not_text(self):
        """Bytes are refused with a TypeError, not silently decoded."""
        self.assertRaises(TypeError, parse_key, MOSH_KEY_TEXT.encode())

    def test_empty(self):
        """The empty string is refused."""
        self.assertRaises(ValueError, parse_key, "")


class FormatKeyTests(SynchronousTestCase):
    """format_key prints mosh's form."""

    def test_mosh_key(self):
        """The recorded key prints as mosh printed it."""
        self.assertEqual(format_key(MOSH_KEY), MOSH_KEY_TEXT)

    def test_wrong_length(self):
        """Only 16-byte keys can be printed."""
        self.assertRaises(ValueError, format_key, b"\0" * 15)
        self.assertRaises(ValueError, format_key, b"\0" * 17)

    @settings(max_examples=50, deadline=None)
    @given(st.binary(min_size=16, max_size=16))
    def test_round_trip(self, key):
        """Every 16-byte key prints to 22 characters that parse back."""
        text = format_key(key)
        self.assertEqual(len(text), 22)
        self.assertEqual(parse_key(text), key)


class DeriveSessionKeyTests(SynchronousTestCase):
    """derive_session_key follows wire.md section 2."""

    def setUp(self):
        self.vectors = _wire_vectors.broker()
        self.secret = bytes.fromhex(self.vectors["device_secret_hex"])

    def test_vectors(self):
        """Every recorded session key is reproduced."""
        self.assertEqual(parse_key(self.vectors["device_secret_base64"]),
                         self.secret)
        for v in self.vectors["vectors"]:
            self.assertEqual(
                derive_session_key(self.secret, v["device_number"],
                                   v["session_id"]).hex(),
                v["session_key_hex"], v["label"])

    def test_bound_to_numbers(self):
        """Another session id or device number gives another key."""
        base = derive_session_key(self.secret, 42, 7)
        self.assertNotEqual(base, derive_session_key(self.secret, 42, 8))
        self.assertNotEqual(base, derive_session_key(self.secret, 43, 7))
        self.assertNotEqual(base, derive_session_key(b"\1" * 16, 42, 7))
        self.assertEqual(len(base), 16)

    def test_bad_inputs(self):
        """Zero or oversized numbers and a wrong-size secret are refused."""
        self.assertRaises(ValueError, derive_session_key, self.secret, 0, 1)
        self.assertRaises(ValueError, derive_session_key, self.secret, 1, 0)
        self.assertRaises(ValueError, derive_session_key, self.secret,
                          2**64, 1)
        self.assertRaises(ValueError, derive_session_key, self.secret, 1,
                          2**64)
        self.assertRaises(ValueError, derive_session_key, b"\0" * 15, 1, 1)
