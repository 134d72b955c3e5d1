"""Device secrets and dashboard access tokens.

Secrets are 16 random bytes shown in mosh's 22-character base64 form.
Tokens are shown once as ``<id>.<secret>`` and stored only as SHA-256
hashes with a role; every comparison is constant-time.
"""

import base64
import hashlib
import hmac
import os

SECRET_BYTES = 16          # AES-128 key size, as mosh's Base64Key
TOKEN_SECRET_BYTES = 24
ROLES = ("read", "write")

try:  # the SSP core owns the canonical form once it exists
    from broker.ssp.keys import format_key, parse_key
except ImportError:
    def format_key(secret):
        """mosh's printed key: standard base64 of 16 bytes without the '=='."""
        if len(secret) != SECRET_BYTES:
            raise ValueError("a device secret is 16 bytes")
        return base64.b64encode(secret).decode("ascii")[:-2]

    def parse_key(text):
        """Inverse of format_key; ValueError on anything but 22 base64 characters."""
        if len(text) != 22:
            raise ValueError("a device key is 22 base64 characters")
        try:
            secret = base64.b64decode(text + "==", validate=True)
        except ValueError as e:
            raise ValueError(f"a device key is 22 base64 characters: {e}") from None
        if len(secret) != SECRET_BYTES or format_key(secret) != text:
            raise ValueError("a device key is 22 base64 characters")
        return secret


def new_secret(random_bytes=os.urandom):
    """A fresh 16-byte device secret."""
    return random_bytes(SECRET_BYTES)


def new_device_number(random_bytes=os.urandom):
    """A random non-zero device number below 2**63 (fits SQLite's signed INTEGER)."""
    while True:
        number = int.from_bytes(random_bytes(8), "big") & ((1 << 63) - 1)
        if number:
            return number


def new_token(random_bytes=os.urandom):
    """A fresh token: ``(token_id, token_text)``; the text is shown once."""
    token_id = random_bytes(6).hex()
    secret = base64.urlsafe_b64encode(random_bytes(TOKEN_SECRET_BYTES)).decode("ascii")
    return token_id, f"{token_id}.{secret}"


def hash_token(token_text):
    """The stored form of a token (text no token has, such as an unpaired
    surrogate, hashes too: it then matches nothing, it does not raise)."""
    return hashlib.sha256(token_text.encode("utf-8", "surrogatepass")).digest()


_DUMMY = hash_token("no-such-token")


class TokenTable:
    """Token hashes by id, checked in constant time."""

    __slots__ = ("_tokens",)

    def __init__(self):
        self._tokens = {}    # token_id -> (digest, role, created_at)

    @classmethod
    def from_rows(cls, rows):
        """A table of stored ``(token_id, digest, role, created_at)`` rows."""
        table = cls()
        for token_id, digest, role, created_at in rows:
            table.add(token_id, digest, role, created_at)
        return table

    def add(self, token_id, digest, role, created_at):
        if role not in ROLES:
            raise ValueError(f"token role must be one of {', '.join(ROLES)}")
        self._tokens[token_id] = (digest, role, created_at)

    def remove(self, token_id):
        return self._tokens.pop(token_id, None) is not None

    def get(self, token_id):
        """``(digest, role, created_at)`` of a token, or None."""
        return self._tokens.get(token_id)

    def __contains__(self, token_id):
        return token_id in self._tokens

    def items(self):
        return sorted(self._tokens.items())

    def check(self, token_text):
        """The role of a valid token, or None; the digest compare is constant-time."""
        if not isinstance(token_text, str):
            return None
        token_id, _, _ = token_text.partition(".")
        digest, role, _ = self._tokens.get(token_id, (_DUMMY, None, None))
        ok = hmac.compare_digest(digest, hash_token(token_text))
        return role if ok and role is not None else None
