"""Sealing and opening mosh datagrams with AES-128-OCB3 (ssp-mosh.md 1.1-1.3).

Wire form: nonce value (u64 BE: bit 63 = direction, bits 0..62 = sequence
number) | ciphertext | 16-byte tag.  The AEAD nonce is 4 zero bytes followed
by those 8 bytes; there is no associated data.  Both directions share one
key, so the direction bit is what keeps client and server nonces apart.
"""

import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from broker.ssp.errors import DatagramDropped, DropReason

TO_SERVER = 0  # network.h Direction: client -> server, bit 63 clear
TO_CLIENT = 1  # network.h Direction: server -> client, bit 63 set

NONCE_SIZE = 8  # cleartext nonce bytes on the wire
TAG_SIZE = 16  # crypto.cc ae_init(ctx, key, 16, 12, 16)
OVERHEAD = NONCE_SIZE + TAG_SIZE  # shorter datagrams are rejected unread
DIRECTION_BIT = 1 << 63
SEQ_LIMIT = 1 << 63  # crypto.cc Crypto::unique() throws before wrapping
SEQ_MASK = SEQ_LIMIT - 1
KEY_SIZE = 16

_NONCE_VALUE = struct.Struct(">Q")
_AEAD_NONCE = struct.Struct(">4xQ")  # crypto.cc Nonce::Nonce(uint64_t)

#: The class every CipherCache builds (``new_cipher``): AESOCB3, or the
#: compiled OCBCipher that broker.ssp.speedups installs (same methods and
#: bytes, keyed once rather than per call).
_cipher_class = AESOCB3


def install_cipher_class(cipher_class) -> None:
    """Build ciphers from now on with ``cipher_class(key)`` (AESOCB3's
    methods); None goes back to AESOCB3. Ciphers already built stay."""
    global _cipher_class
    _cipher_class = AESOCB3 if cipher_class is None else cipher_class


def new_cipher(key: bytes):
    """An AES-128-OCB3 cipher for ``key``, of the installed class."""
    return _cipher_class(key)


# aead_nonce(nonce_value) -> the 12-byte OCB nonce for a wire nonce value
# (direction << 63 | seq); a bound method, as it runs for every datagram.
aead_nonce = _AEAD_NONCE.pack
# nonce_value_from(data, offset=0) -> (nonce_value,) read from the wire.
nonce_value_from = _NONCE_VALUE.unpack_from


def seal(cipher: AESOCB3, direction: int, seq: int, plaintext: bytes,
         prefix: bytes = b"") -> bytes:
    """Encrypt one datagram: prefix | nonce(8) | ciphertext | tag(16).

    ``prefix`` is the broker framing header (empty for plain mosh).  Raises
    ValueError for a sequence number that does not fit 63 bits: a nonce must
    never repeat under one key.
    """
    if not 0 <= seq < SEQ_LIMIT:
        raise ValueError(f"sequence number {seq} outside 0..2**63-1")
    if direction not in (TO_SERVER, TO_CLIENT):
        raise ValueError(f"direction must be 0 or 1, got {direction}")
    nonce_value = (direction << 63) | seq
    return b"".join((
        prefix,
        _NONCE_VALUE.pack(nonce_value),
        cipher.encrypt(aead_nonce(nonce_value), plaintext, None),
    ))


def open_sealed(cipher: AESOCB3, data: bytes,
                offset: int = 0) -> tuple[int, int, bytes]:
    """Decrypt the datagram at ``data[offset:]``; return (direction, seq,
    plaintext).

    ``offset`` skips a framing header without copying it away first.
    Raises DatagramDropped SHORT (under 24 bytes, crypto.cc
    Session::decrypt) or AUTH_FAILED (tag mismatch).
    """
    if len(data) - offset < OVERHEAD:
        raise DatagramDropped(DropReason.SHORT,
                              f"{len(data) - offset} bytes, need at least "
                              f"{OVERHEAD}")
    (nonce_value,) = nonce_value_from(data, offset)
    try:
        plaintext = cipher.decrypt(aead_nonce(nonce_value),
                                   data[offset + NONCE_SIZE:], None)
    except InvalidTag:
        raise DatagramDropped(DropReason.AUTH_FAILED,
                              "packet failed integrity check") from None
    return nonce_value >> 63, nonce_value & SEQ_MASK, plaintext


class CipherCache:
    """A bounded LRU of ciphers (``new_cipher``'s) keyed by the 16-byte key.

    Shared by all sessions: building the key schedule costs far more than a
    lookup, and an idle session keeps only its 16-byte key.
    """

    __slots__ = ("capacity", "_ciphers", "misses")

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ciphers: OrderedDict[bytes, AESOCB3] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._ciphers)

    def get(self, key: bytes):
        """The cipher for ``key``, built on a miss (evicting the oldest)."""
        ciphers = self._ciphers
        cipher = ciphers.get(key)
        if cipher is not None:
            ciphers.move_to_end(key)
            return cipher
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-128 key must be {KEY_SIZE} bytes, "
                             f"got {len(key)}")
        key = bytes(key)
        cipher = _cipher_class(key)
        self.misses += 1
        ciphers[key] = cipher
        if len(ciphers) > self.capacity:
            ciphers.popitem(last=False)
        return cipher

    def discard(self, key: bytes) -> None:
        """Forget a key (e.g. when its session is retired)."""
        self._ciphers.pop(key, None)
