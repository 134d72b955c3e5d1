/*
 * broker/ssp/_speedups_ocb.c: OCBCipher, AES-128-OCB3 (RFC 7253) through
 * OpenSSL's EVP interface, for mosh's datagrams (crypto.py: 12-byte
 * nonces, 16-byte tags).
 *
 * Why: cryptography's AESOCB3 copies a keyed OpenSSL context for every
 * call and frees it after, and each call from C makes a nonce object and
 * a copy of the data; a datagram's seal or open then costs two to three
 * times the cipher's own work. An OCBCipher keys two contexts once (OCB
 * picks its bulk routine by direction when it is keyed) and only sets the
 * nonce per call; the send and receive paths seal into and open from their
 * own buffers.
 *
 * Its Python methods take AESOCB3's arguments and raise what it raises
 * (cryptography's InvalidTag), so every caller of a cipher in
 * broker.ssp.crypto's CipherCache may get one; tests/ssp/test_ocb.py
 * checks it against AESOCB3. Built only where setup.py finds OpenSSL 3's
 * headers and libcrypto (SP_HAVE_OPENSSL); without them, or where that
 * libcrypto offers no AES-128-OCB, the module has no OCBCipher and
 * AESOCB3 is used. The nonce is the caller's, as with
 * AESOCB3: nothing here counts or chooses one.
 */

#include "_speedups.h"

#ifdef SP_HAVE_OPENSSL

#include <limits.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#define OCB_KEY_SIZE 16
#define OCB_NONCE_SIZE 12
#define OCB_TAG_SIZE 16

/* Each call runs from its nonce to its tag with the GIL held and no Python
 * code in between: a cipher is shared by every session of its key, and
 * its contexts hold one call's state at a time. */
typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *seal;   /* keyed to encrypt */
    EVP_CIPHER_CTX *open;   /* keyed to decrypt */
} OCBCipher;

/* cryptography.exceptions.InvalidTag, imported when the module is. */
static PyObject *invalid_tag;
/* AES-128-OCB fetched from its provider once: EVP_aes_128_ocb() would be
 * looked up again by each context's setup (OpenSSL 3's implicit fetch). */
static EVP_CIPHER *ocb_algorithm;

/* An OpenSSL failure as a Python exception; its error queue emptied
 * (Python's ssl and hashlib modules share this libcrypto and its queue). */
static void
raise_openssl(const char *what)
{
    unsigned long code = ERR_get_error();
    char reason[256] = "no reason given";
    if (code != 0)
        ERR_error_string_n(code, reason, sizeof(reason));
    ERR_clear_error();
    PyErr_Format(PyExc_RuntimeError, "OpenSSL AES-128-OCB %s failed: %s",
                 what, reason);
}

static EVP_CIPHER_CTX *
keyed_context(const unsigned char *key, int encrypting)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        raise_openssl("context");
        return NULL;
    }
    if (EVP_CipherInit_ex(ctx, ocb_algorithm, NULL, NULL, NULL,
                          encrypting) != 1
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN,
                                   OCB_NONCE_SIZE, NULL) != 1
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, OCB_TAG_SIZE,
                                   NULL) != 1
            || EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL,
                                 encrypting) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        raise_openssl("key setup");
        return NULL;
    }
    return ctx;
}

/* Sizes OpenSSL takes as int: the data and its tag must fit. */
static int
fits(Py_ssize_t size)
{
    if (size > INT_MAX - OCB_TAG_SIZE) {
        PyErr_SetString(PyExc_OverflowError,
                        "data or associated data too long for one call");
        return 0;
    }
    return 1;
}

/* A call's start: the nonce set, the associated data (if any) taken. */
static int
start_call(EVP_CIPHER_CTX *ctx, const unsigned char *nonce,
           const unsigned char *aad, Py_ssize_t aad_size, int encrypting)
{
    int ignored;
    return EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, encrypting) == 1
        && (aad_size == 0
            || EVP_CipherUpdate(ctx, NULL, &ignored, aad, (int)aad_size) == 1);
}

SP_INTERNAL int
ocb_seal(PyObject *cipher, const unsigned char *nonce,
         const unsigned char *aad, Py_ssize_t aad_size,
         const unsigned char *in, Py_ssize_t size, unsigned char *out)
{
    EVP_CIPHER_CTX *ctx = ((OCBCipher *)cipher)->seal;
    int written = 0, last = 0;
    if (!fits(size) || !fits(aad_size))
        return -1;
    if (!start_call(ctx, nonce, aad, aad_size, 1)
            || EVP_CipherUpdate(ctx, out, &written, in, (int)size) != 1
            || EVP_CipherFinal_ex(ctx, out + written, &last) != 1
            || written + last != size
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, OCB_TAG_SIZE,
                                   out + size) != 1) {
        raise_openssl("encrypt");
        return -1;
    }
    return 0;
}

SP_INTERNAL int
ocb_open(PyObject *cipher, const unsigned char *nonce,
         const unsigned char *aad, Py_ssize_t aad_size,
         const unsigned char *in, Py_ssize_t size, unsigned char *out)
{
    EVP_CIPHER_CTX *ctx = ((OCBCipher *)cipher)->open;
    Py_ssize_t plain = size - OCB_TAG_SIZE;
    int written = 0, last = 0;
    unsigned char nothing[OCB_TAG_SIZE];
    if (plain < 0)
        return 1;
    if (plain == 0)
        out = nothing;   /* (an empty bytes object is shared: never its buffer) */
    if (!fits(plain) || !fits(aad_size))
        return -1;
    if (!start_call(ctx, nonce, aad, aad_size, 0)
            || EVP_CipherUpdate(ctx, out, &written, in, (int)plain) != 1
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, OCB_TAG_SIZE,
                                   (void *)(in + plain)) != 1) {
        raise_openssl("decrypt");
        return -1;
    }
    if (EVP_CipherFinal_ex(ctx, out + written, &last) != 1) {
        /* the tag did not match: what was written is not to be used */
        ERR_clear_error();
        return 1;
    }
    if (written + last != plain) {
        raise_openssl("decrypt");
        return -1;
    }
    return 0;
}

SP_INTERNAL int
is_ocb_cipher(PyObject *obj)
{
    return Py_TYPE(obj) == &OCBCipherType;
}

/* ---------------------------------------------------------------------
 * The Python type: AESOCB3's constructor and methods, 12-byte nonces.
 * ------------------------------------------------------------------ */

static PyObject *
cipher_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:OCBCipher", names,
                                     &key))
        return NULL;
    if (key.len != OCB_KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "AES-128 key must be %d bytes, got %zd",
                     OCB_KEY_SIZE, key.len);
        PyBuffer_Release(&key);
        return NULL;
    }
    OCBCipher *self = (OCBCipher *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->seal = keyed_context(key.buf, 1);
        self->open = self->seal ? keyed_context(key.buf, 0) : NULL;
        if (self->open == NULL)
            Py_CLEAR(self);
    }
    PyBuffer_Release(&key);
    return (PyObject *)self;
}

static void
cipher_dealloc(OCBCipher *self)
{
    /* EVP_CIPHER_CTX_free wipes the key schedules */
    EVP_CIPHER_CTX_free(self->seal);
    EVP_CIPHER_CTX_free(self->open);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The arguments of encrypt and decrypt: (nonce, data, associated_data). */
typedef struct {
    Py_buffer nonce, data, aad;
    int have_aad;
} CallArgs;

static int
parse_call(PyObject *const *args, Py_ssize_t nargs, const char *name,
           CallArgs *call)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes 3 arguments (nonce, data, associated_data), "
                     "%zd given", name, nargs);
        return -1;
    }
    call->have_aad = 0;
    if (PyObject_GetBuffer(args[0], &call->nonce, PyBUF_SIMPLE) < 0)
        return -1;
    if (call->nonce.len != OCB_NONCE_SIZE) {
        PyErr_Format(PyExc_ValueError, "nonce must be %d bytes, got %zd",
                     OCB_NONCE_SIZE, call->nonce.len);
        PyBuffer_Release(&call->nonce);
        return -1;
    }
    if (PyObject_GetBuffer(args[1], &call->data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&call->nonce);
        return -1;
    }
    if (args[2] != Py_None) {
        if (PyObject_GetBuffer(args[2], &call->aad, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&call->nonce);
            PyBuffer_Release(&call->data);
            return -1;
        }
        call->have_aad = 1;
    }
    return 0;
}

static void
release_call(CallArgs *call)
{
    PyBuffer_Release(&call->nonce);
    PyBuffer_Release(&call->data);
    if (call->have_aad)
        PyBuffer_Release(&call->aad);
}

static PyObject *
cipher_encrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CallArgs call;
    if (parse_call(args, nargs, "encrypt", &call) < 0)
        return NULL;
    PyObject *sealed = fits(call.data.len)
        ? PyBytes_FromStringAndSize(NULL, call.data.len + OCB_TAG_SIZE)
        : NULL;
    if (sealed != NULL
            && ocb_seal(self, call.nonce.buf,
                        call.have_aad ? call.aad.buf : NULL,
                        call.have_aad ? call.aad.len : 0, call.data.buf,
                        call.data.len,
                        (unsigned char *)PyBytes_AS_STRING(sealed)) < 0)
        Py_CLEAR(sealed);
    release_call(&call);
    return sealed;
}

static PyObject *
cipher_decrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CallArgs call;
    if (parse_call(args, nargs, "decrypt", &call) < 0)
        return NULL;
    Py_ssize_t plain = call.data.len - OCB_TAG_SIZE;
    PyObject *opened = PyBytes_FromStringAndSize(NULL, plain < 0 ? 0 : plain);
    if (opened != NULL) {
        int verdict = ocb_open(self, call.nonce.buf,
                               call.have_aad ? call.aad.buf : NULL,
                               call.have_aad ? call.aad.len : 0,
                               call.data.buf, call.data.len,
                               (unsigned char *)PyBytes_AS_STRING(opened));
        if (verdict != 0) {
            Py_CLEAR(opened);
            if (verdict == 1)
                PyErr_SetNone(invalid_tag);
        }
    }
    release_call(&call);
    return opened;
}

static PyMethodDef cipher_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))cipher_encrypt, METH_FASTCALL,
     "encrypt(nonce, data, associated_data) -> ciphertext and tag, as "
     "AESOCB3's (12-byte nonces)."},
    {"decrypt", (PyCFunction)(void (*)(void))cipher_decrypt, METH_FASTCALL,
     "decrypt(nonce, data, associated_data) -> plaintext, or InvalidTag, "
     "as AESOCB3's (12-byte nonces)."},
    {NULL, NULL, 0, NULL},
};

SP_INTERNAL PyTypeObject OCBCipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.ssp._speedups.OCBCipher",
    .tp_doc = "OCBCipher(key): AES-128-OCB3 with 12-byte nonces and 16-byte "
              "tags, keyed once; AESOCB3's encrypt and decrypt.",
    .tp_basicsize = sizeof(OCBCipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = cipher_new,
    .tp_dealloc = (destructor)cipher_dealloc,
    .tp_methods = cipher_methods,
};

/* OCBCipher and HAVE_OPENSSL (whether it is there): a libcrypto without
 * AES-128-OCB (a FIPS-only configuration, say) leaves it out, and the
 * module is imported all the same. */
SP_INTERNAL int
add_ocb_cipher(PyObject *module)
{
    if (invalid_tag == NULL) {
        PyObject *exceptions = PyImport_ImportModule("cryptography.exceptions");
        if (exceptions == NULL)
            return -1;
        invalid_tag = PyObject_GetAttrString(exceptions, "InvalidTag");
        Py_DECREF(exceptions);
        if (invalid_tag == NULL)
            return -1;
    }
    if (ocb_algorithm == NULL)
        ocb_algorithm = EVP_CIPHER_fetch(NULL, "AES-128-OCB", NULL);
    if (ocb_algorithm == NULL) {
        ERR_clear_error();
        return PyModule_AddObjectRef(module, "HAVE_OPENSSL", Py_False);
    }
    if (PyType_Ready(&OCBCipherType) < 0
            || PyModule_AddObjectRef(module, "OCBCipher",
                                     (PyObject *)&OCBCipherType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "HAVE_OPENSSL", Py_True);
}

#else   /* no OpenSSL: AESOCB3 is every session's cipher */

SP_INTERNAL int
is_ocb_cipher(PyObject *obj)
{
    (void)obj;
    return 0;
}

SP_INTERNAL int
ocb_seal(PyObject *cipher, const unsigned char *nonce,
         const unsigned char *aad, Py_ssize_t aad_size,
         const unsigned char *in, Py_ssize_t size, unsigned char *out)
{
    (void)cipher; (void)nonce; (void)aad; (void)aad_size; (void)in;
    (void)size; (void)out;
    PyErr_SetString(PyExc_SystemError, "built without OpenSSL");
    return -1;
}

SP_INTERNAL int
ocb_open(PyObject *cipher, const unsigned char *nonce,
         const unsigned char *aad, Py_ssize_t aad_size,
         const unsigned char *in, Py_ssize_t size, unsigned char *out)
{
    return ocb_seal(cipher, nonce, aad, aad_size, in, size, out);
}

SP_INTERNAL int
add_ocb_cipher(PyObject *module)
{
    return PyModule_AddObjectRef(module, "HAVE_OPENSSL", Py_False);
}

#endif
