"""Tests for broker.registry.secrets: keys and access tokens."""

from twisted.trial.unittest import SynchronousTestCase

from broker.registry import errors
from broker.registry.secrets import format_key, parse_key
from .helpers import make_registry


class KeyFormatTests(SynchronousTestCase):
    """Device secrets print in mosh's 22-character base64 form."""

    def test_round_trip(self):
        """format_key/parse_key round-trip 16 bytes through 22 characters."""
        secret = bytes(range(16))
        text = format_key(secret)
        self.assertEqual(text, "AAECAwQFBgcICQoLDA0ODw")
        self.assertEqual(parse_key(text), secret)

    def test_bad_key_text(self):
        """Wrong length or alphabet is a ValueError."""
        for text in ("short", "AAECAwQFBgcICQoLDA0OD!", "AAECAwQFBgcICQoLDA0ODw=="):
            self.assertRaises(ValueError, parse_key, text)


class TokenTests(SynchronousTestCase):
    """Dashboard tokens: roles, hashes, revocation."""

    def setUp(self):
        self.registry, self.store, _ = make_registry()

    def test_roles(self):
        """A token checks to its role; anything else checks to None."""
        rid, rtext = self.successResultOf(self.registry.add_token("read"))
        wid, wtext = self.successResultOf(self.registry.add_token("write"))
        self.assertEqual(self.registry.check_token(rtext), "read")
        self.assertEqual(self.registry.check_token(wtext), "write")
        for bad in (rtext + "x", rid, "", "x.y", None, wtext[:-1]):
            self.assertIsNone(self.registry.check_token(bad))
        self.assertEqual(sorted(t.role for t in self.registry.tokens()), ["read", "write"])

    def test_text_that_is_not_unicode_is_no_token(self):
        """Token text with an unpaired surrogate (a JSON or WebSocket peer can send one)
        checks to None, never raises."""
        token_id, _ = self.successResultOf(self.registry.add_token("read"))
        for bad in ("\ud800", token_id + ".\udfff", "x" * 40 + "\udbff"):
            self.assertIsNone(self.registry.check_token(bad))

    def test_stored_as_hash(self):
        """The store never sees the token text."""
        _, text = self.successResultOf(self.registry.add_token("read"))
        self.assertNotIn(text.encode(), repr(self.store.tokens).encode())
        self.assertNotIn(text.split(".")[1], repr(self.store.tokens))

    def test_revoke(self):
        """A revoked token no longer checks; revoking twice is UnknownToken."""
        tid, text = self.successResultOf(self.registry.add_token("write"))
        self.successResultOf(self.registry.revoke_token(tid))
        self.assertIsNone(self.registry.check_token(text))
        self.failureResultOf(self.registry.revoke_token(tid), errors.UnknownToken)

    def test_bad_role(self):
        """Only read and write are roles."""
        self.failureResultOf(self.registry.add_token("admin"), errors.InvalidValue)
