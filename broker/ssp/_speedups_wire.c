/*
 * broker/ssp/_speedups_wire.c: a datagram up to the instruction
 * (broker/ssp/incoming.py _receive and _accept, broker/ssp/datagram.py
 * DatagramLayer.decrypt and accept, RTTEstimator.add_sample_ms,
 * broker/ssp/instruction.py parse_instruction). Each check changes
 * nothing; what it found goes into the Work for change() (_speedups.c).
 */

#include "_speedups.h"

#ifdef SP_HAVE_ZLIB
#include <zlib.h>

/* zlib.decompress(data) for a stream whose whole output fits the work's
 * buffer: the same library and the same checks (zlib header, adler32),
 * without the module call, its 16 KiB buffer and two bytes objects. 0 and
 * the size, or -1 when Python's call must decide (an error, more output,
 * bytes after the stream's end, which zlib.decompress ignores). */
static int
inflate_small(Work *w, const unsigned char *data, Py_ssize_t size,
              Py_ssize_t *inflated)
{
    z_stream stream;
    memset(&stream, 0, sizeof(stream));
    if (size > (Py_ssize_t)UINT32_MAX || inflateInit(&stream) != Z_OK)
        return -1;
    stream.next_in = (Bytef *)data;
    stream.avail_in = (uInt)size;
    stream.next_out = w->inflated;
    stream.avail_out = (uInt)sizeof(w->inflated);
    int status = inflate(&stream, Z_FINISH);
    uInt left = stream.avail_in;
    *inflated = (Py_ssize_t)(sizeof(w->inflated) - stream.avail_out);
    inflateEnd(&stream);
    return status == Z_STREAM_END && left == 0 ? 0 : -1;
}
#endif

/* ---------------------------------------------------------------------
 * Protobuf: TransportInstruction (instruction.py parse_instruction), the
 * strict way: fields 1..7 at most once each, with their own wire types
 * and one-byte tags; anything else is handed over (protobuf would skip
 * unknown fields or take the last of repeated ones: Python decides).
 * ------------------------------------------------------------------ */

static int
read_varint(const unsigned char **p, const unsigned char *end,
            uint64_t *out)
{
    uint64_t value = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        unsigned char byte = *(*p)++;
        if (shift == 63 && byte > 1)
            return -1;  /* past 64 bits */
        value |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 0;
        }
    }
    return -1;  /* truncated, or longer than 10 bytes */
}

static int
parse_instruction(const State *st, const unsigned char *p, Py_ssize_t size,
                  Instruction *inst)
{
    const unsigned char *end = p + size;
    unsigned int seen = 0;
    uint64_t value, *target;
    memset(inst, 0, sizeof(*inst));
    inst->diff = (const unsigned char *)"";
    while (p < end) {
        unsigned int tag = *p++;
        unsigned int field = tag >> 3, wire_type = tag & 7;
        if (tag & 0x80 || field < 1 || field > 7 || seen & (1u << field))
            return HAND_OVER;  /* an unknown field or a repeated one */
        seen |= 1u << field;
        if (field <= 5) {
            if (wire_type != 0 || read_varint(&p, end, &value) < 0)
                return HAND_OVER;
            switch (field) {
            case 1:
                /* parse_instruction: version != PROTOCOL_VERSION */
                if (value != (uint64_t)st->protocol_version)
                    return HAND_OVER;
                continue;
            case 2: target = &inst->old_num; break;
            case 3: target = &inst->new_num; break;
            case 4: target = &inst->ack_num; break;
            default: target = &inst->throwaway_num; break;
            }
            *target = value;
        }
        else {
            if (wire_type != 2 || read_varint(&p, end, &value) < 0
                    || value > (uint64_t)(end - p))
                return HAND_OVER;
            if (field == 6) {
                inst->diff = p;
                inst->diff_len = (Py_ssize_t)value;
            }
            p += value;  /* field 7, the chaff, is not used */
        }
    }
    /* an absent protocol_version is 0: BAD_VERSION */
    return seen & (1u << 1) ? GO : HAND_OVER;
}

/* ---------------------------------------------------------------------
 * Before the decrypt, and the decrypt.
 * ------------------------------------------------------------------ */

/* Everything that can be checked before the decrypt; sets *offset (where
 * the sealed datagram starts). -1: an error (binding the session type). */
int
check_framing(State *st, Work *w, PyObject *session, PyObject *data,
              PyObject *now, Py_ssize_t *offset)
{
    /* the slots below are SSPSession's (a subclass may do otherwise) */
    if (Py_TYPE(session) != st->session_type)
        return HAND_OVER;
    PyObject *flags = SLOT(session, st->s.flags);
    if (flags == NULL || !PyLong_CheckExact(flags))
        return HAND_OVER;
    w->flags = PyLong_AsLong(flags);
    if (w->flags == -1 && PyErr_Occurred())
        return HAND_OVER;
    /* _receive: if self._flags & CLOSED: return */
    if (w->flags & st->closed)
        return HAND_OVER;
    /* _receive: data exactly bytes (else bytes(data), or a memoryview) */
    if (!PyBytes_CheckExact(data))
        return HAND_OVER;
    PyObject *header = SLOT(session, st->s.header);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (header == Py_None)
        *offset = 0;
    else if (header != NULL && PyBytes_CheckExact(header)
             && PyBytes_GET_SIZE(header) == st->header_size
             && size >= st->header_size
             && memcmp(PyBytes_AS_STRING(data), PyBytes_AS_STRING(header),
                       st->header_size) == 0)
        *offset = st->header_size;
    else
        return HAND_OVER;  /* _receive: not data.startswith(header) */
    /* decrypt: len(data) - offset < OVERHEAD (SHORT) */
    if (size - *offset < st->overhead)
        return HAND_OVER;
    /* now: a float, or an int that int(now * 1000) takes exactly */
    if (PyFloat_CheckExact(now))
        w->now = PyFloat_AS_DOUBLE(now);
    else if (PyLong_CheckExact(now)) {
        long long whole = PyLong_AsLongLong(now);
        if ((whole == -1 && PyErr_Occurred())
                || whole > (1LL << 40) || whole < -(1LL << 40))
            return HAND_OVER;
        w->now = (double)whole;
    }
    else
        return HAND_OVER;
    if (!(fabs(w->now * 1000.0) < 4.0e18))
        return HAND_OVER;  /* accept: int(now * 1000) of inf or NaN */
    /* the parts, of their own classes (another class: Python) */
    PyObject *link = SLOT(session, st->s.link);
    PyObject *sender = SLOT(session, st->s.sender);
    PyObject *receiver = SLOT(session, st->s.receiver);
    if (link == NULL || Py_TYPE(link) != st->link_type || sender == NULL
            || Py_TYPE(sender) != st->sender_type || receiver == NULL
            || Py_TYPE(receiver) != st->receiver_type)
        return HAND_OVER;  /* e.g. a ResumedReceiver */
    w->link = Py_NewRef(link);
    w->sender = Py_NewRef(sender);
    w->receiver = Py_NewRef(receiver);
    return GO;
}

static PyObject *cipher_lookup(const State *, PyObject *, PyObject *);

/* self._ciphers.get(self._key) (new reference): CipherCache.get's hit
 * done here (ciphers.get(key), then move_to_end(key): the cache's order
 * stays exactly Python's); a miss, or another provider, calls get(). */
PyObject *
cipher_for(const State *st, PyObject *ciphers, PyObject *key)
{
    /* the callers' references are borrowed from the session's slots,
     * which the calls below (Python code, the GC) may replace */
    Py_INCREF(ciphers);
    Py_INCREF(key);
    PyObject *cipher = cipher_lookup(st, ciphers, key);
    Py_DECREF(ciphers);
    Py_DECREF(key);
    return cipher;
}

static PyObject *
cipher_lookup(const State *st, PyObject *ciphers, PyObject *key)
{
    if (Py_TYPE(ciphers) == st->cipher_cache_type) {
        PyObject *cache = SLOT(ciphers, st->cc.ciphers);
        if (cache != NULL && Py_TYPE(cache) == st->ordered_dict_type) {
            /* cipher = ciphers.get(key) (OrderedDict.get is dict's) */
            PyObject *cipher = PyDict_GetItemWithError(cache, key);
            if (cipher == NULL && PyErr_Occurred())
                return NULL;
            if (cipher != NULL && cipher != Py_None) {
                /* if cipher is not None: ciphers.move_to_end(key) */
                Py_INCREF(cipher);
                Py_INCREF(cache);
                PyObject *args[2] = {cache, key};
                PyObject *done = PyObject_VectorcallMethod(
                    st->str_move_to_end, args, 2, NULL);
                Py_DECREF(cache);
                if (done == NULL) {
                    Py_DECREF(cipher);
                    return NULL;
                }
                Py_DECREF(done);
                return cipher;
            }
        }
    }
    PyObject *args[2] = {ciphers, key};
    return PyObject_VectorcallMethod(st->str_get, args, 2, NULL);
}

/* An OCBCipher's open, from the datagram's buffer to the plaintext's:
 * decrypt's answer; the cipher's reference is taken. */
static int
open_in_place(Work *w, PyObject *cipher, PyObject *data, Py_ssize_t offset,
              const char *nonce)
{
    const unsigned char *sealed = (const unsigned char *)PyBytes_AS_STRING(data)
        + offset + NONCE_SIZE;
    Py_ssize_t size = PyBytes_GET_SIZE(data) - offset - NONCE_SIZE;
    /* (the checks before the decrypt leave at least the tag) */
    PyObject *plaintext = PyBytes_FromStringAndSize(NULL, size - 16);
    int verdict = plaintext == NULL ? -1
        : ocb_open(cipher, (const unsigned char *)nonce, NULL, 0, sealed, size,
                   (unsigned char *)PyBytes_AS_STRING(plaintext));
    Py_DECREF(cipher);
    if (verdict != 0) {
        Py_XDECREF(plaintext);
        return verdict;
    }
    w->plaintext = plaintext;
    return 0;
}

/* DatagramLayer.decrypt with the session's cipher (an OCBCipher's in C;
 * another's, cryptography's AESOCB3, through its own Python API): 0, 1 for
 * InvalidTag, -1 for another error. */
int
decrypt(const State *st, Work *w, PyObject *session, PyObject *data,
        Py_ssize_t offset)
{
    PyObject *ciphers = get_slot(session, st->s.ciphers, "_ciphers");
    PyObject *key = get_slot(session, st->s.key, "_key");
    if (ciphers == NULL || key == NULL)
        return -1;
    PyObject *cipher = cipher_for(st, ciphers, key);
    if (cipher == NULL)
        return -1;
    /* cipher.decrypt(aead_nonce(nonce_value), data[offset + 8:], None) */
    const char *sealed_at = PyBytes_AS_STRING(data) + offset;
    char nonce[12] = {0};
    memcpy(nonce + 4, sealed_at, NONCE_SIZE);
    w->nonce_value = read_be64((const unsigned char *)sealed_at);
    if (is_ocb_cipher(cipher))
        return open_in_place(w, cipher, data, offset, nonce);
    PyObject *nonce_bytes = PyBytes_FromStringAndSize(nonce, 12);
    PyObject *sealed = PyBytes_FromStringAndSize(
        sealed_at + NONCE_SIZE,
        PyBytes_GET_SIZE(data) - offset - NONCE_SIZE);
    PyObject *plaintext = NULL;
    if (nonce_bytes != NULL && sealed != NULL) {
        PyObject *args[4] = {cipher, nonce_bytes, sealed, Py_None};
        plaintext = PyObject_VectorcallMethod(st->str_decrypt, args, 4,
                                              NULL);
    }
    Py_DECREF(cipher);
    Py_XDECREF(nonce_bytes);
    Py_XDECREF(sealed);
    if (plaintext == NULL) {
        if (nonce_bytes != NULL && sealed != NULL
                && PyErr_ExceptionMatches(st->invalid_tag)) {
            PyErr_Clear();
            return 1;
        }
        return -1;
    }
    w->plaintext = plaintext;
    return 0;
}

/* ---------------------------------------------------------------------
 * After the decrypt: DatagramLayer.accept and the instruction.
 * ------------------------------------------------------------------ */

/* DatagramLayer.accept, for an in-order datagram from the known address. */
int
check_accept(const State *st, Work *w, PyObject *address)
{
    PyObject *link = w->link;
    const unsigned char *plain =
        (const unsigned char *)PyBytes_AS_STRING(w->plaintext);
    Py_ssize_t size = PyBytes_GET_SIZE(w->plaintext);
    long direction_in;
    uint64_t expected;

    PyObject *direction = SLOT(link, st->l.direction_in);
    if (direction == NULL || !PyLong_CheckExact(direction))
        return HAND_OVER;
    direction_in = PyLong_AsLong(direction);
    /* accept: nonce_value >> 63 != self.direction_in (WRONG_DIRECTION) */
    if ((long)(w->nonce_value >> 63) != direction_in)
        return HAND_OVER;
    /* accept: len(plaintext) < TIMESTAMP_SIZE; _accept: < _FRAGMENT_END */
    if (size < FRAGMENT_END)
        return HAND_OVER;
    /* accept: seq < self.expected_seq (out of order or replayed) */
    uint64_t seq = w->nonce_value & SEQ_MASK;
    if (as_u64(SLOT(link, st->l.expected_seq), &expected) < 0
            || seq < expected)
        return HAND_OVER;
    /* accept: direction_in == TO_SERVER and address != remote_address
     * (roaming; a first address is no roam but still a change) */
    if (direction_in == 0) {
        PyObject *remote = SLOT(link, st->l.remote_address);
        if (remote == NULL || remote == Py_None)
            return HAND_OVER;
        Py_INCREF(remote);  /* the comparison may run Python code */
        PyObject *differs = PyObject_RichCompare(address, remote, Py_NE);
        Py_DECREF(remote);
        if (differs == NULL)
            return HAND_OVER;
        int moved = PyObject_IsTrue(differs);
        Py_DECREF(differs);
        if (moved != 0)
            return HAND_OVER;
    }
    if ((w->next_expected = PyLong_FromUnsignedLongLong(seq + 1)) == NULL)
        return HAND_OVER;
    /* now_ms = int(now * 1000) */
    long long now_ms = (long long)(w->now * 1000.0);
    if ((w->now_ms = PyLong_FromLongLong(now_ms)) == NULL)
        return HAND_OVER;
    unsigned int timestamp = read_be16(plain);
    unsigned int reply = read_be16(plain + 2);
    if ((long)timestamp != st->no_timestamp
            && (w->timestamp = PyLong_FromLong((long)timestamp)) == NULL)
        return HAND_OVER;
    if ((long)reply == st->no_timestamp)
        return GO;
    /* add_sample_ms((now16 - reply) & 0xFFFF) */
    unsigned int now16 = (unsigned int)((uint64_t)now_ms & 0xFFFF);
    if ((long)now16 == st->no_timestamp)
        now16 = 0;
    long r = (long)((now16 - reply) & 0xFFFF);
    if ((double)r >= st->max_sample_ms)
        return GO;  /* add_sample_ms: r >= MAX_SAMPLE * 1000, ignored */
    PyObject *rtt = SLOT(link, st->l.rtt);
    if (rtt == NULL || Py_TYPE(rtt) != st->rtt_type)
        return HAND_OVER;
    w->rtt = Py_NewRef(rtt);
    PyObject *hit = SLOT(rtt, st->r.hit);
    w->rtt_sample = 1;
    if (hit == Py_False) {
        /* add_sample_ms: the first sample, SRTT = r, RTTVAR = r / 2 */
        w->srtt = PyLong_FromLong(r);
        w->rttvar = PyFloat_FromDouble((double)r / 2.0);
    }
    else if (hit == Py_True) {
        double srtt, rttvar;
        /* a huge int srtt: Python subtracts r exactly, then rounds */
        if (ms_of(SLOT(rtt, st->r.srtt_ms), &srtt) < 0
                || ms_of(SLOT(rtt, st->r.rttvar_ms), &rttvar) < 0)
            return HAND_OVER;
        double delta = srtt - (double)r;
        double new_rttvar = (1 - st->beta) * rttvar
            + st->beta * fabs(delta);
        double new_srtt = (1 - st->alpha) * srtt + st->alpha * (double)r;
        w->srtt = PyFloat_FromDouble(new_srtt);
        w->rttvar = PyFloat_FromDouble(new_rttvar);
    }
    else
        return HAND_OVER;  /* hit is not a bool */
    return (w->srtt == NULL || w->rttvar == NULL) ? HAND_OVER : GO;
}

/* _accept's fragment, inflate and parse: one fragment, a small stream. */
int
check_instruction(const State *st, Work *w)
{
    const unsigned char *plain =
        (const unsigned char *)PyBytes_AS_STRING(w->plaintext);
    Py_ssize_t size = PyBytes_GET_SIZE(w->plaintext);
    /* _accept: word == FINAL_BIT (fragment 0 and final), else assembly */
    if ((long)read_be16(plain + 12) != st->final_bit)
        return HAND_OVER;
    /* _accept: len(compressed) < _INFLATE_AT_ONCE, else inflate() */
    if (size - FRAGMENT_END >= st->inflate_at_once)
        return HAND_OVER;
#ifdef SP_HAVE_ZLIB
    Py_ssize_t inflated;
    if (inflate_small(w, plain + FRAGMENT_END, size - FRAGMENT_END,
                      &inflated) == 0)
        return parse_instruction(st, w->inflated, inflated, &w->inst);
#endif
    PyObject *compressed = PyBytes_FromStringAndSize(
        (const char *)plain + FRAGMENT_END, size - FRAGMENT_END);
    if (compressed == NULL)
        return HAND_OVER;
    /* _accept: raw = _decompress(compressed) (BAD_ZLIB on zlib.error) */
    PyObject *raw = PyObject_CallOneArg(st->decompress, compressed);
    Py_DECREF(compressed);
    if (raw == NULL)
        return HAND_OVER;
    w->raw = raw;  /* the diff points into it */
    if (!PyBytes_CheckExact(raw))
        return HAND_OVER;
    return parse_instruction(st, (const unsigned char *)PyBytes_AS_STRING(raw),
                             PyBytes_GET_SIZE(raw), &w->inst);
}
