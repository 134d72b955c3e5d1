/*
 * broker/ssp/_speedups_diff.c: DeviceState.diff_from's usual case
 * (broker/ssp/device_state.py diff_from, _changed_since and same), for
 * the send path (_speedups_send.c check_diff).
 *
 * Why: a node's new state is diffed against the state the broker
 * acknowledged once or twice per send; the method takes about a
 * microsecond (its frame, _changed_since's, cbor2's call), the test and
 * the few bytes below a tenth of that.
 *
 * What: two exact DeviceStates whose events end at the same index (the
 * diff carries values only) and whose values are text, bytes, booleans,
 * integers of at most 64 bits, or floats. The changed values are written
 * as the method writes them: one as plain CBOR, more in canonical order
 * (cbor2's: encoded keys by length, then bytewise), and a float in its
 * canonical form however many (the shortest of binary16, 32 and 64 that
 * keeps its value, as cbor2 chooses). Anything else (events, arrays,
 * maps, more than MAX_CHANGED changes) returns NULL without an
 * exception: the caller calls the method.
 */

#include "_speedups.h"

#include <float.h>

#define MAX_CHANGED 32

typedef struct {
    PyObject *key, *value;          /* borrowed; value NULL: deleted */
    const char *text;               /* the key's UTF-8 */
    Py_ssize_t text_size, encoded_size;
    /* the value's head (major type, argument) and the bytes after it
     * (text, bytes; NULL for the others) */
    int major;                      /* 7: null, true, false; 8: a float */
    uint64_t argument;
    const char *data;
    unsigned char number[9];        /* a float's bytes */
} Change;

static Py_ssize_t
head_size(uint64_t argument)
{
    return argument < 24 ? 1 : argument < 0x100 ? 2
        : argument < 0x10000 ? 3 : argument < 0x100000000 ? 5 : 9;
}

static unsigned char *
write_head(unsigned char *p, int major, uint64_t argument)
{
    Py_ssize_t size = head_size(argument);
    static const unsigned char info[] = {0, 0, 24, 25, 0, 26, 0, 0, 0, 27};
    *p++ = (unsigned char)((major << 5)
                           | (size == 1 ? (int)argument : info[size]));
    for (Py_ssize_t shift = (size - 2) * 8; size > 1 && shift >= 0;
         shift -= 8)
        *p++ = (unsigned char)(argument >> shift);
    return p;
}

/* same(a, b) of device_state.py for values that are not a and not
 * both exact ints: 1, 0, or HAND_OVER_SAME where Python must say. */
#define HAND_OVER_SAME 2
static int
same_value(PyObject *a, PyObject *b)
{
    PyTypeObject *kind = Py_TYPE(a);
    if (kind != Py_TYPE(b))
        return 0;
    if (kind == &PyUnicode_Type || kind == &PyBytes_Type
            || kind == &PyLong_Type) {
        int equal = PyObject_RichCompareBool(a, b, Py_EQ);
        return equal < 0 ? HAND_OVER_SAME : equal;
    }
    if (kind == &PyBool_Type)
        return 0;   /* (a is not b) */
    if (kind == &PyFloat_Type) {
        double x = PyFloat_AS_DOUBLE(a), y = PyFloat_AS_DOUBLE(b);
        return x == y && (x != 0.0 || copysign(1.0, x) == copysign(1.0, y));
    }
    return HAND_OVER_SAME;   /* arrays, maps */
}

/* _changed_since(old): the changes into changes[], their count in *count;
 * GO, or HAND_OVER (no exception). */
static int
changed_since(PyObject *mine, PyObject *old, Change *changes,
              Py_ssize_t *count)
{
    Py_ssize_t n = 0, fresh = 0, pos = 0;
    PyObject *key, *value;
    *count = 0;
    if (mine == old)
        return GO;
    while (PyDict_Next(mine, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key))
            return HAND_OVER;
        PyObject *previous = PyDict_GetItemWithError(old, key);
        if (previous == value)
            continue;
        int changed;
        if (previous == NULL) {
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return HAND_OVER;
            }
            changed = 1;
            fresh++;
        }
        else {
            int same = same_value(previous, value);
            if (same == HAND_OVER_SAME) {
                PyErr_Clear();
                return HAND_OVER;
            }
            changed = !same;
        }
        if (changed) {
            if (n == MAX_CHANGED)
                return HAND_OVER;
            changes[n].key = key;
            changes[n++].value = value;
        }
    }
    /* every other key of old is one of ours: only more means deletions */
    if (PyDict_GET_SIZE(old) > PyDict_GET_SIZE(mine) - fresh) {
        pos = 0;
        while (PyDict_Next(old, &pos, &key, &value)) {
            if (!PyUnicode_CheckExact(key))
                return HAND_OVER;
            int kept = PyDict_Contains(mine, key);
            if (kept < 0) {
                PyErr_Clear();
                return HAND_OVER;
            }
            if (kept)
                continue;
            if (n == MAX_CHANGED)
                return HAND_OVER;
            changes[n].key = key;
            changes[n++].value = NULL;
        }
    }
    *count = n;
    return GO;
}

/* Whether a finite or infinite double is exactly a binary16 (its bits in
 * *bits): cbor2's canonical float is the shortest form that keeps the
 * value. */
static int
half_of(double value, uint16_t *bits)
{
    uint16_t sign = signbit(value) ? 0x8000 : 0;
    double a = fabs(value);
    if (isinf(a) || a == 0.0) {
        *bits = sign | (isinf(a) ? 0x7c00 : 0);
        return 1;
    }
    int e;
    double m = frexp(a, &e);        /* a = m * 2**e, 0.5 <= m < 1 */
    if (e - 1 >= -14 && e - 1 <= 15) {
        double significand = ldexp(m, 11);   /* 11 bits: 1024..2047 */
        if (significand != floor(significand))
            return 0;
        *bits = sign | (uint16_t)((e - 1 + 15) << 10)
            | (uint16_t)((int)significand - 1024);
        return 1;
    }
    double steps = ldexp(a, 24);    /* a subnormal: k * 2**-24, k < 1024 */
    if (e - 1 < -14 && steps == floor(steps) && steps < 1024.0) {
        *bits = sign | (uint16_t)steps;
        return 1;
    }
    return 0;
}

/* A float's canonical encoding into out (9 bytes at most): its size. */
static Py_ssize_t
minimal_float(double value, unsigned char *out)
{
    uint16_t half;
    if (half_of(value, &half)) {
        out[0] = 0xf9;
        out[1] = (unsigned char)(half >> 8);
        out[2] = (unsigned char)half;
        return 3;
    }
    uint64_t bits;
    if (fabs(value) <= FLT_MAX && (double)(float)value == value) {
        float single = (float)value;
        uint32_t word;
        memcpy(&word, &single, 4);
        out[0] = 0xfa;
        for (int i = 0; i < 4; i++)
            out[1 + i] = (unsigned char)(word >> (24 - 8 * i));
        return 5;
    }
    memcpy(&bits, &value, 8);
    out[0] = 0xfb;
    for (int i = 0; i < 8; i++)
        out[1 + i] = (unsigned char)(bits >> (56 - 8 * i));
    return 9;
}

/* A value's encoded size (its head and bytes kept in c), or -1 where
 * Python must encode it (an exception may be set). */
static Py_ssize_t
value_size(Change *c)
{
    PyObject *value = c->value;
    uint64_t *argument = &c->argument;
    int *major = &c->major;
    const char **data = &c->data;
    *data = NULL;
    if (value == NULL || PyBool_Check(value)) {
        *major = 7;   /* null, true, false: one byte */
        return 1;
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long signed_value = PyLong_AsLongLongAndOverflow(value,
                                                              &overflow);
        if (overflow == 0 && !(signed_value == -1 && PyErr_Occurred())) {
            *major = signed_value < 0;
            *argument = signed_value < 0 ? (uint64_t)(-1 - signed_value)
                                         : (uint64_t)signed_value;
        }
        else if (overflow > 0) {
            unsigned long long big = PyLong_AsUnsignedLongLong(value);
            if (big == (unsigned long long)-1 && PyErr_Occurred())
                return -1;   /* past 64 bits: cbor2's bignum, or its error */
            *major = 0;
            *argument = big;
        }
        else
            return -1;   /* below -2**63: rare, cbor2 writes it */
        return head_size(*argument);
    }
    if (PyFloat_CheckExact(value)) {
        *major = 8;   /* written whole into c->number */
        return minimal_float(PyFloat_AS_DOUBLE(value), c->number);
    }
    Py_ssize_t size;
    if (PyUnicode_CheckExact(value)) {
        *data = PyUnicode_AsUTF8AndSize(value, &size);
        if (*data == NULL)
            return -1;   /* lone surrogates: cbor2's error */
        *major = 3;
    }
    else if (PyBytes_CheckExact(value)) {
        *data = PyBytes_AS_STRING(value);
        size = PyBytes_GET_SIZE(value);
        *major = 2;
    }
    else
        return -1;   /* an array, a map */
    *argument = (uint64_t)size;
    return head_size(*argument) + size;
}

/* Canonical order: the encoded keys by length, then bytewise (a key's
 * head is fixed by its length, so its UTF-8 decides among equal sizes). */
static int
canonical_order(const void *x, const void *y)
{
    const Change *a = x, *b = y;
    if (a->encoded_size != b->encoded_size)
        return a->encoded_size < b->encoded_size ? -1 : 1;
    return memcmp(a->text, b->text, (size_t)a->text_size);
}

/* The diff's bytes for changes[0..count): b"\xa1\x00" and the map. */
static PyObject *
encode_changes(Change *changes, Py_ssize_t count)
{
    Py_ssize_t total = 2 + head_size((uint64_t)count);
    for (Py_ssize_t i = 0; i < count; i++) {
        Change *c = &changes[i];
        c->text = PyUnicode_AsUTF8AndSize(c->key, &c->text_size);
        if (c->text == NULL) {
            PyErr_Clear();
            return NULL;
        }
        c->encoded_size = head_size((uint64_t)c->text_size) + c->text_size;
        Py_ssize_t size = value_size(c);
        if (size < 0) {
            PyErr_Clear();
            return NULL;
        }
        total += c->encoded_size + size;
    }
    if (count > 1)
        qsort(changes, (size_t)count, sizeof(Change), canonical_order);
    PyObject *diff = PyBytes_FromStringAndSize(NULL, total);
    if (diff == NULL) {
        PyErr_Clear();
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(diff);
    *p++ = 0xa1;
    *p++ = 0x00;
    p = write_head(p, 5, (uint64_t)count);
    for (Py_ssize_t i = 0; i < count; i++) {
        Change *c = &changes[i];
        p = write_head(p, 3, (uint64_t)c->text_size);
        memcpy(p, c->text, (size_t)c->text_size);
        p += c->text_size;
        if (c->major == 7)
            *p++ = c->value == NULL ? 0xf6 : c->value == Py_True ? 0xf5 : 0xf4;
        else if (c->major == 8)
            p += minimal_float(PyFloat_AS_DOUBLE(c->value), p);
        else {
            p = write_head(p, c->major, c->argument);
            if (c->data != NULL) {
                memcpy(p, c->data, (size_t)c->argument);
                p += c->argument;
            }
        }
    }
    return diff;
}

/* current.diff_from(base) for a diff of values only: a new reference,
 * or NULL without an exception where the method must say. */
PyObject *
diff_values(const State *st, PyObject *current, PyObject *base)
{
    if (current == base)
        return PyBytes_FromStringAndSize(NULL, 0);
    if (Py_TYPE(current) != st->state_type || Py_TYPE(base) != st->state_type)
        return NULL;
    PyObject *mine = SLOT(current, st->ds.values);
    PyObject *old = SLOT(base, st->ds.values);
    PyObject *events = SLOT(current, st->ds.events);
    PyObject *old_events = SLOT(base, st->ds.events);
    uint64_t first, old_first;
    if (mine == NULL || old == NULL || !PyDict_CheckExact(mine)
            || !PyDict_CheckExact(old) || events == NULL
            || old_events == NULL || !PyTuple_CheckExact(events)
            || !PyTuple_CheckExact(old_events)
            || as_u64(SLOT(current, st->ds.event_base), &first) < 0
            || as_u64(SLOT(base, st->ds.event_base), &old_first) < 0)
        return NULL;
    /* the same end: no event to carry (an earlier end is the method's) */
    if (first + (uint64_t)PyTuple_GET_SIZE(events)
            != old_first + (uint64_t)PyTuple_GET_SIZE(old_events))
        return NULL;
    Change changes[MAX_CHANGED];
    Py_ssize_t count;
    if (changed_since(mine, old, changes, &count) != GO)
        return NULL;
    if (count == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    return encode_changes(changes, count);
}
