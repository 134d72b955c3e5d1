"""Tests for broker.ssp.crypto: nonces, sealing, opening, the cipher cache."""

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.crypto import (OVERHEAD, TO_CLIENT, TO_SERVER, CipherCache,
                               aead_nonce, open_sealed, seal)
from broker.ssp.errors import DatagramDropped, DropReason
from tests.ssp import _wire_vectors

KEY = bytes(range(16))


class NonceTests(SynchronousTestCase):
    """The 12-byte OCB nonce is 4 zero bytes + direction|seq."""

    def test_vectors(self):
        """Every recorded AEAD nonce is rebuilt from direction and seq."""
        data = _wire_vectors.mosh()
        for v in data["vectors"] + data["rejected_by_server"]:
            value = (v["direction_bit"] << 63) | v["seq"]
            self.assertEqual(aead_nonce(value).hex(), v["aead_nonce_hex"])


class SealTests(SynchronousTestCase):
    """seal() builds prefix | nonce | ciphertext | tag."""

    def setUp(self):
        self.cipher = AESOCB3(KEY)

    def test_layout(self):
        """The datagram is 8 nonce bytes, ciphertext and a 16-byte tag."""
        wire = seal(self.cipher, TO_CLIENT, 5, b"hello")
        self.assertEqual(len(wire), 5 + OVERHEAD)
        self.assertEqual(wire[:8], bytes.fromhex("8000000000000005"))
        self.assertEqual(wire[8:], self.cipher.encrypt(
            b"\0\0\0\0" + wire[:8], b"hello", None))

    def test_direction_bit(self):
        """Client datagrams have bit 63 clear, server datagrams set."""
        self.assertLess(seal(self.cipher, TO_SERVER, 0, b"x")[0], 0x80)
        self.assertGreaterEqual(seal(self.cipher, TO_CLIENT, 0, b"x")[0], 0x80)

    def test_prefix(self):
        """The prefix is prepended unchanged and opening skips it by offset."""
        wire = seal(self.cipher, TO_SERVER, 9, b"payload", b"HEAD")
        self.assertEqual(wire[:4], b"HEAD")
        self.assertEqual(open_sealed(self.cipher, wire, 4),
                         (TO_SERVER, 9, b"payload"))

    def test_sequence_limit(self):
        """A sequence number outside 63 bits is refused: no nonce reuse."""
        seal(self.cipher, TO_SERVER, 2**63 - 1, b"x")
        self.assertRaises(ValueError, seal, self.cipher, TO_SERVER, 2**63,
                          b"x")
        self.assertRaises(ValueError, seal, self.cipher, TO_SERVER, -1, b"x")

    def test_bad_direction(self):
        """Only 0 and 1 are directions."""
        self.assertRaises(ValueError, seal, self.cipher, 2, 0, b"x")


class OpenSealedTests(SynchronousTestCase):
    """open_sealed() authenticates or raises DatagramDropped."""

    def setUp(self):
        self.cipher = AESOCB3(KEY)

    def test_round_trip(self):
        """A sealed datagram opens to its direction, seq and plaintext."""
        wire = seal(self.cipher, TO_CLIENT, 2**62 + 3, b"abc")
        self.assertEqual(open_sealed(self.cipher, wire),
                         (TO_CLIENT, 2**62 + 3, b"abc"))

    def test_empty_plaintext(self):
        """A 24-byte datagram (empty plaintext) still authenticates."""
        wire = seal(self.cipher, TO_SERVER, 1, b"")
        self.assertEqual(open_sealed(self.cipher, wire), (TO_SERVER, 1, b""))

    def test_short(self):
        """Under 24 bytes is SHORT, before any decryption."""
        wire = seal(self.cipher, TO_SERVER, 1, b"")
        e = self.assertRaises(DatagramDropped, open_sealed, self.cipher,
                              wire[:-1])
        self.assertEqual(e.reason, DropReason.SHORT)
        e = self.assertRaises(DatagramDropped, open_sealed, self.cipher,
                              b"HEAD" + wire[:-1], 4)
        self.assertEqual(e.reason, DropReason.SHORT)

    def test_every_bit_is_authenticated(self):
        """Flipping any bit, nonce included, makes authentication fail."""
        wire = seal(self.cipher, TO_SERVER, 7, b"some plaintext")
        for i in range(len(wire)):
            for bit in (0x01, 0x80):
                bad = bytearray(wire)
                bad[i] ^= bit
                e = self.assertRaises(DatagramDropped, open_sealed,
                                      self.cipher, bytes(bad))
                self.assertEqual(e.reason, DropReason.AUTH_FAILED)

    def test_wrong_key(self):
        """Another key fails authentication."""
        wire = seal(self.cipher, TO_SERVER, 7, b"x")
        e = self.assertRaises(DatagramDropped, open_sealed,
                              AESOCB3(b"\xff" * 16), wire)
        self.assertEqual(e.reason, DropReason.AUTH_FAILED)


class CipherCacheTests(SynchronousTestCase):
    """CipherCache is a bounded LRU of ciphers."""

    def test_hit_returns_same_cipher(self):
        """A second get of one key returns the same object, one miss."""
        cache = CipherCache()
        first = cache.get(KEY)
        self.assertIs(cache.get(KEY), first)
        self.assertEqual(cache.misses, 1)
        wire = seal(first, TO_SERVER, 0, b"x")
        self.assertEqual(open_sealed(AESOCB3(KEY), wire)[2], b"x")

    def test_least_recently_used_evicted(self):
        """Over capacity the least recently used key goes, not the oldest."""
        cache = CipherCache(capacity=2)
        a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
        cipher_a = cache.get(a)
        cache.get(b)
        cache.get(a)  # a is now more recent than b
        cache.get(c)
        self.assertEqual(len(cache), 2)
        self.assertIs(cache.get(a), cipher_a)
        self.assertEqual(cache.misses, 3)
        cache.get(b)
        self.assertEqual(cache.misses, 4)

    def test_discard(self):
        """A discarded key is rebuilt on the next get."""
        cache = CipherCache()
        cache.get(KEY)
        cache.discard(KEY)
        cache.discard(KEY)  # absent: no error
        self.assertEqual(len(cache), 0)
        cache.get(KEY)
        self.assertEqual(cache.misses, 2)

    def test_bad_key(self):
        """A key that is not 16 bytes is refused and not cached."""
        cache = CipherCache()
        self.assertRaises(ValueError, cache.get, b"short")
        self.assertRaises(ValueError, cache.get, b"x" * 32)
        self.assertEqual(len(cache), 0)

    def test_bad_capacity(self):
        """A cache must hold at least one cipher."""
        self.assertRaises(ValueError, CipherCache, 0)
