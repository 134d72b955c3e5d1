"""Device secrets in mosh's printed form, and per-session key derivation.

mosh prints its 16-byte key as 22 characters of standard base64 with the
``==`` padding removed, and parses it strictly (``Base64Key`` in
``src/crypto/crypto.cc``): exactly 22 characters of the alphabet, and
re-encoding must give the same text, so the last character carries only
2 data bits.  Each broker session gets its own key derived with HKDF from
the device secret and every header byte (wire.md section 2), so a changed
header only makes authentication fail.
"""

import base64
import binascii
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.ssp.framing import FRAMING_VERSION, UINT64_MAX

KEY_SIZE = 16  # bytes; mosh Base64Key::key_len
KEY_TEXT_LENGTH = 22  # characters; base64 of 16 bytes without "=="
KDF_INFO_PREFIX = b"ssp-broker/1"  # wire.md section 2

_ALPHABET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_U64 = struct.Struct(">Q")
_INFO_TAIL = struct.Struct(">BQ")


def parse_key(text: str) -> bytes:
    """Parse mosh's 22-character key text into 16 bytes.

    Raises ValueError naming the exact problem (length, padding, character,
    non-canonical last character).
    """
    if not isinstance(text, str):
        raise TypeError(f"key text must be str, not {type(text).__name__}")
    if "=" in text:
        raise ValueError("key must be given without '=' padding "
                         f"({KEY_TEXT_LENGTH} characters)")
    if len(text) != KEY_TEXT_LENGTH:
        raise ValueError(f"key must be {KEY_TEXT_LENGTH} characters of "
                         f"base64, got {len(text)}")
    for position, char in enumerate(text):
        if char not in _ALPHABET:
            # The position, not the character: a key is a secret, even in part.
            raise ValueError(f"key has a character outside standard base64 "
                             f"at position {position}")
    try:
        key = base64.b64decode(text + "==", validate=True)
    except binascii.Error as e:  # unreachable after the checks; be precise
        raise ValueError(f"key is not valid base64: {e}") from None
    if base64.b64encode(key).decode("ascii")[:KEY_TEXT_LENGTH] != text:
        # mosh re-encodes and compares: the last character's low 4 bits
        # must be zero, so each key has exactly one printed form.
        raise ValueError("key is not in canonical form: its last character "
                         "has non-zero low bits")
    return key


def format_key(key: bytes) -> str:
    """Print a 16-byte key as mosh does: 22 base64 characters, no padding."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return base64.b64encode(bytes(key)).decode("ascii")[:KEY_TEXT_LENGTH]


def _check_u64(name: str, value: int) -> None:
    if not 0 < value <= UINT64_MAX:
        raise ValueError(f"{name} must be a non-zero u64, got {value}")


def derive_session_key(secret: bytes, device_number: int,
                       session_id: int) -> bytes:
    """HKDF-SHA256 session key bound to the whole framing header.

    salt = session id (8 bytes BE); info = b"ssp-broker/1" + version byte +
    device number (8 bytes BE); 16 bytes out (wire.md section 2).
    """
    if len(secret) != KEY_SIZE:
        raise ValueError(f"device secret must be {KEY_SIZE} bytes, "
                         f"got {len(secret)}")
    _check_u64("device_number", device_number)
    _check_u64("session_id", session_id)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=_U64.pack(session_id),
        info=KDF_INFO_PREFIX + _INFO_TAIL.pack(FRAMING_VERSION, device_number),
    )
    return hkdf.derive(bytes(secret))
