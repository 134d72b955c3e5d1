"""The extension's OCBCipher (broker/ssp/_speedups_ocb.c) against
cryptography's AESOCB3, the reference: the same bytes, the same
refusals, and the ciphers every CipherCache builds.

An OCBCipher keeps two keyed OpenSSL contexts and sets only the nonce per
call, so the tests also run many calls on one cipher, interleaved and
after failures: a context that kept anything from an earlier call would
show here.
"""

import os
import subprocess
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import crypto, speedups

try:
    from broker.ssp import _speedups
except ImportError:     # not built: the tests skip
    _speedups = None

OCBCipher = getattr(_speedups, "OCBCipher", None)

#: RFC 7253 appendix A (AES-128, 16-byte tags): nonce, associated data,
#: plaintext, ciphertext and tag.
RFC_KEY = bytes(range(16))
RFC_VECTORS = (
    ("BBAA99887766554433221100", "", "", "785407BFFFC8AD9EDCC5520AC9111EE6"),
    ("BBAA99887766554433221101", "0001020304050607", "0001020304050607",
     "6820B3657B6F615A5725BDA0D3B4EB3A257C9AF1F8F03009"),
    ("BBAA99887766554433221102", "0001020304050607", "",
     "81017F8203F081277152FADE694A0A00"),
    ("BBAA99887766554433221103", "", "0001020304050607",
     "45DD69F8F5AAE72414054CD1F35D82760B2CD00D2F99BFA9"),
)

KEYS = st.binary(min_size=16, max_size=16)
NONCES = st.binary(min_size=12, max_size=12)
#: Up to three blocks and a part either side of each block's edge.
DATA = st.one_of(st.binary(max_size=70),
                 st.sampled_from([15, 16, 17, 31, 32, 33, 47, 48, 49]).map(
                     lambda size: os.urandom(size)),
                 st.binary(min_size=200, max_size=1500))
ASSOCIATED = st.one_of(st.none(), st.binary(max_size=40))


class CipherTestCase(SynchronousTestCase):
    def setUp(self):
        if OCBCipher is None:
            raise self.skipTest("the extension has no OCBCipher: "
                                + (speedups.unavailable_reason
                                   or "built without OpenSSL"))


class SameBytesTests(CipherTestCase):
    """What AESOCB3 writes and opens, OCBCipher writes and opens."""

    def test_rfc_7253_vectors(self):
        cipher = OCBCipher(RFC_KEY)
        for nonce, associated, plaintext, sealed in RFC_VECTORS:
            nonce, sealed = bytes.fromhex(nonce), bytes.fromhex(sealed)
            associated = bytes.fromhex(associated) or None
            plaintext = bytes.fromhex(plaintext)
            self.assertEqual(cipher.encrypt(nonce, plaintext, associated),
                             sealed)
            self.assertEqual(cipher.decrypt(nonce, sealed, associated),
                             plaintext)

    @settings(max_examples=600, deadline=None)
    @given(KEYS, st.lists(st.tuples(NONCES, DATA, ASSOCIATED), min_size=1,
                          max_size=6))
    def test_against_aesocb3(self, key, calls):
        """Each call on one OCBCipher, encrypt and decrypt in turn, as
        AESOCB3's; each opens the other's."""
        ours, reference = OCBCipher(key), AESOCB3(key)
        for nonce, data, associated in calls:
            sealed = reference.encrypt(nonce, data, associated)
            self.assertEqual(ours.encrypt(nonce, data, associated), sealed)
            self.assertEqual(ours.decrypt(nonce, sealed, associated), data)
            self.assertEqual(reference.decrypt(
                nonce, ours.encrypt(nonce, data, associated), associated), data)

    def test_buffers(self):
        """bytearray and memoryview arguments, as AESOCB3 takes them."""
        key, nonce = os.urandom(16), os.urandom(12)
        data = os.urandom(40)
        sealed = AESOCB3(key).encrypt(nonce, data, b"ad")
        cipher = OCBCipher(bytearray(key))
        self.assertEqual(cipher.encrypt(memoryview(nonce), bytearray(data),
                                        memoryview(b"ad")), sealed)
        self.assertEqual(cipher.decrypt(bytearray(nonce), memoryview(sealed),
                                        bytearray(b"ad")), data)


class RefusalTests(CipherTestCase):
    """What does not authenticate raises InvalidTag, and the cipher goes
    on as before."""

    @settings(max_examples=200, deadline=None)
    @given(KEYS, NONCES, DATA, ASSOCIATED, st.data())
    def test_any_changed_bit(self, key, nonce, data, associated, draw):
        cipher = OCBCipher(key)
        sealed = cipher.encrypt(nonce, data, associated)
        bit = draw.draw(st.integers(0, 8 * len(sealed) - 1))
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with self.assertRaises(InvalidTag):
            cipher.decrypt(nonce, bytes(tampered), associated)
        other_nonce = bytes([nonce[0] ^ 1]) + nonce[1:]
        with self.assertRaises(InvalidTag):
            cipher.decrypt(other_nonce, sealed, associated)
        with self.assertRaises(InvalidTag):
            cipher.decrypt(nonce, sealed, (associated or b"") + b"x")
        # the failures left nothing behind
        self.assertEqual(cipher.decrypt(nonce, sealed, associated), data)
        self.assertEqual(cipher.encrypt(nonce, data, associated), sealed)

    def test_shorter_than_a_tag(self):
        cipher = OCBCipher(bytes(16))
        for size in range(16):
            with self.assertRaises(InvalidTag):
                cipher.decrypt(bytes(12), bytes(size), None)

    def test_another_key(self):
        sealed = OCBCipher(bytes(16)).encrypt(bytes(12), b"reading", None)
        with self.assertRaises(InvalidTag):
            OCBCipher(b"\x01" + bytes(15)).decrypt(bytes(12), sealed, None)

    def test_bad_arguments(self):
        """A key or nonce of another size, a missing argument, a str: the
        error names the problem; nothing is sealed."""
        for key in (b"", bytes(15), bytes(17), bytes(32)):
            with self.assertRaisesRegex(ValueError, "16 bytes"):
                OCBCipher(key)
        with self.assertRaises(TypeError):
            OCBCipher("sixteen chars!!!")
        cipher = OCBCipher(bytes(16))
        for nonce in (bytes(11), bytes(13), bytes(15)):
            for method in (cipher.encrypt, cipher.decrypt):
                with self.assertRaisesRegex(ValueError, "nonce must be 12"):
                    method(nonce, bytes(20), None)
        with self.assertRaisesRegex(TypeError, "3 arguments"):
            cipher.encrypt(bytes(12), b"data")
        with self.assertRaises(TypeError):
            cipher.encrypt(bytes(12), "data", None)
        with self.assertRaises(TypeError):
            cipher.decrypt(bytes(12), bytes(20), "associated")


class InstalledTests(CipherTestCase):
    """The compiled path makes OCBCipher every CipherCache's class."""

    def test_cache_builds_ocb_ciphers(self):
        if speedups.fast_send is None:
            raise self.skipTest(speedups.unavailable_reason)
        cache = crypto.CipherCache(2)
        self.assertIs(type(cache.get(bytes(16))), OCBCipher)
        self.assertIs(type(crypto.new_cipher(bytes(16))), OCBCipher)

    def test_install_and_back(self):
        saved = crypto._cipher_class
        self.addCleanup(crypto.install_cipher_class, saved)
        crypto.install_cipher_class(None)
        self.assertIs(type(crypto.CipherCache(2).get(bytes(16))), AESOCB3)
        crypto.install_cipher_class(OCBCipher)
        self.assertIs(type(crypto.CipherCache(2).get(bytes(16))), OCBCipher)

    def test_twins_compare_both_ciphers(self):
        """The differential tests' pure world seals with AESOCB3 and the
        fast one with OCBCipher (tests.ssp.speedups_twins)."""
        if speedups.fast_send is None:
            raise self.skipTest(speedups.unavailable_reason)
        from tests.ssp.linksim import DEVICE_SECRET
        from tests.ssp.speedups_twins import CONFIGS, Twin
        twin = Twin(CONFIGS["broker"])
        self.assertIs(type(twin.fast.device._ciphers.get(DEVICE_SECRET)),
                      OCBCipher)
        self.assertIs(type(twin.pure.device._ciphers.get(DEVICE_SECRET)),
                      AESOCB3)


class WithoutOCBTests(CipherTestCase):
    """A libcrypto that does not offer AES-128-OCB (here: only OpenSSL's base
    provider, as a FIPS-only configuration would leave it) leaves OCBCipher
    out; the extension and every other compiled path still load, and the
    sessions seal with AESOCB3 (cryptography's own OpenSSL)."""

    def test_base_provider_only(self):
        if speedups.fast_send is None:
            raise self.skipTest(speedups.unavailable_reason)
        config = self.mktemp()
        with open(config, "w", encoding="ascii") as handle:
            handle.write("openssl_conf = init\n[init]\nproviders = providers\n"
                         "[providers]\nbase = base\n[base]\nactivate = 1\n")
        code = ("from broker.ssp import _speedups, speedups, crypto; "
                "cipher = crypto.CipherCache(2).get(bytes(16)); "
                "print(_speedups.HAVE_OPENSSL, hasattr(_speedups, 'OCBCipher'), "
                "speedups.fast_send is not None, speedups.cipher_library, "
                "type(cipher).__name__, cipher.encrypt(bytes(12), b'x', None).hex())")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, OPENSSL_CONF=os.path.abspath(config))
        env.pop(speedups.PURE_PYTHON_VARIABLE, None)
        result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        sealed = AESOCB3(bytes(16)).encrypt(bytes(12), b"x", None).hex()
        self.assertEqual(result.stdout.split(),
                         ["False", "False", "True", "cryptography", "AESOCB3", sealed])
