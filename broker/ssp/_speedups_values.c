/*
 * broker/ssp/_speedups_values.c: the values of device states, compared
 * and written, in their usual cases:
 *   diff_values   DeviceState.diff_from (device_state.py diff_from,
 *                 _changed_since, same), for the send path's check_diff;
 *   with_numbers  DeviceState.with_numbers (a node's reading);
 *   values_patch  broker/udp/convert.py reported_patch (the registry patch
 *                 of a report);
 *   state_record  broker/udp/convert.py encode_state (a session record).
 *
 * Why: each runs once or twice per report, on one side or the other of
 * the fleet, and each took about a microsecond in Python (frames, a
 * cbor2 call) for a few comparisons and bytes.
 *
 * What: exact DeviceStates, text keys, scalar values (text, bytes,
 * booleans, integers of at most 64 bits, floats). Anything else (events to
 * carry, arrays, maps, more than MAX_CHANGED changes, a subclass) returns
 * NULL without an exception: the Python code decides.
 *
 * diff_values writes the changed values as the method writes them: one
 * as plain CBOR, more in canonical order (cbor2's: encoded keys by length,
 * then bytewise), and a float in its canonical form however many (the
 * shortest of binary16, 32 and 64 that keeps its value, as cbor2
 * chooses). state_record writes cbor2's plain bytes (floats as binary64
 * but the infinities, in dict order).
 */

#include "_speedups.h"

#include <float.h>

#define MAX_CHANGED 32

typedef struct {
    PyObject *key, *value;          /* value NULL: deleted; borrowed, and
                                     * held before an allocation */
    const char *text;               /* the key's UTF-8 */
    Py_ssize_t text_size, encoded_size;
    /* the value's head (major type, argument) and the bytes after it
     * (text, bytes; NULL for the others) */
    int major;                      /* 7: null, true, false; 8: a float
                                     * (its bytes in number, as many as
                                     * argument) */
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
        *major = 8;   /* written whole into c->number, its size in argument */
        *argument = (uint64_t)minimal_float(PyFloat_AS_DOUBLE(value), c->number);
        return (Py_ssize_t)*argument;
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

/* One map entry: the key's text, then the value as value_size (or
 * plain_size) found it. */
static unsigned char *
write_entry(unsigned char *p, const Change *c)
{
    p = write_head(p, 3, (uint64_t)c->text_size);
    memcpy(p, c->text, (size_t)c->text_size);
    p += c->text_size;
    if (c->major == 7)
        *p++ = c->value == NULL ? 0xf6 : c->value == Py_True ? 0xf5 : 0xf4;
    else if (c->major == 8) {
        memcpy(p, c->number, (size_t)c->argument);
        p += c->argument;
    }
    else {
        p = write_head(p, c->major, c->argument);
        if (c->data != NULL) {
            memcpy(p, c->data, (size_t)c->argument);
            p += c->argument;
        }
    }
    return p;
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
    for (Py_ssize_t i = 0; i < count; i++)
        p = write_entry(p, &changes[i]);
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

/* ---------------------------------------------------------------------
 * with_numbers: DeviceState.with_numbers.
 * ------------------------------------------------------------------ */

/* An exact int within -(2**64) .. 2**64 - 1 (a DeviceState's range): 1,
 * 0, or -1 with an exception. */
static int
int_in_range(PyObject *value)
{
    int overflow;
    long long small = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (small == -1 && PyErr_Occurred())
        return -1;
    if (overflow == 0)
        return 1;
    /* past 63 bits: the magnitude (or -value - 1) within 64 */
    PyObject *magnitude = overflow > 0 ? Py_NewRef(value)
                                       : PyNumber_Invert(value);
    if (magnitude == NULL)
        return -1;
    unsigned long long big = PyLong_AsUnsignedLongLong(magnitude);
    Py_DECREF(magnitude);
    if (big == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* A new DeviceState of values and state's events (make_state). */
static PyObject *
state_with(const State *st, PyObject *state, PyObject *values)
{
    PyObject *events = SLOT(state, st->ds.events);
    PyObject *base = SLOT(state, st->ds.event_base);
    if (events == NULL || base == NULL)
        return NULL;
    return make_state(st, Py_NewRef(values), Py_NewRef(events),
                      Py_NewRef(base));
}

/* The held references of changes[0..count). */
static void
release_changes(Change *changes, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(changes[i].key);
        Py_XDECREF(changes[i].value);
    }
}

/* state.with_numbers(patch): a new reference (state itself, a new state,
 * or None), or NULL (an exception, or none: None is the caller's). The
 * patch is read whole before anything is allocated (an allocation may
 * run the cyclic GC, and code that changes the patch). */
PyObject *
with_numbers(const State *st, PyObject *state, PyObject *patch)
{
    if (Py_TYPE(state) != st->state_type || !PyDict_CheckExact(patch))
        return NULL;
    PyObject *mine = SLOT(state, st->ds.values);
    if (mine == NULL || !PyDict_CheckExact(mine))
        return NULL;
    Change changes[MAX_CHANGED];
    Py_ssize_t count = 0, pos = 0;
    PyObject *key, *value, *result = NULL;
    while (PyDict_Next(patch, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key))
            goto none;
        PyTypeObject *kind = Py_TYPE(value);
        if (kind == &PyLong_Type) {
            int fits = int_in_range(value);
            if (fits < 0)
                goto done;
            if (!fits)
                goto none;
        }
        else if (kind != &PyFloat_Type || !isfinite(PyFloat_AS_DOUBLE(value)))
            goto none;
        PyObject *current = PyDict_GetItemWithError(mine, key);
        if (current == NULL) {
            if (PyErr_Occurred())
                goto done;
            goto none;
        }
        PyTypeObject *held = Py_TYPE(current);
        if (held != &PyLong_Type && held != &PyFloat_Type)
            goto none;
        if (held == kind) {
            int same;
            if (kind == &PyLong_Type) {
                same = PyObject_RichCompareBool(current, value, Py_EQ);
                if (same < 0)
                    goto done;
            }
            else {
                double x = PyFloat_AS_DOUBLE(current), y = PyFloat_AS_DOUBLE(value);
                same = x == y && copysign(1.0, x) == copysign(1.0, y);
            }
            if (same)
                continue;
        }
        if (count == MAX_CHANGED)
            goto none;
        changes[count].key = Py_NewRef(key);
        changes[count++].value = Py_NewRef(value);
    }
    if (count == 0) {
        result = Py_NewRef(state);
        goto done;
    }
    Py_INCREF(mine);
    PyObject *values = PyDict_Copy(mine);
    Py_DECREF(mine);
    if (values == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++)
        if (PyDict_SetItem(values, changes[i].key, changes[i].value) < 0) {
            Py_DECREF(values);
            goto done;
        }
    result = state_with(st, state, values);
    Py_DECREF(values);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    release_changes(changes, count);
    return result;
}

/* ---------------------------------------------------------------------
 * values_patch: convert.py reported_patch, for scalar values.
 * ------------------------------------------------------------------ */

/* reported_patch(old, new): a new dict, or NULL without an exception
 * where the Python code must make it (a new value that is an array or a
 * map: its plain form, or a merge patch). */
PyObject *
values_patch(const State *st, PyObject *old, PyObject *new)
{
    if (Py_TYPE(old) != st->state_type || Py_TYPE(new) != st->state_type)
        return NULL;
    PyObject *old_values = SLOT(old, st->ds.values);
    PyObject *new_values = SLOT(new, st->ds.values);
    if (old_values == NULL || new_values == NULL
            || !PyDict_CheckExact(old_values) || !PyDict_CheckExact(new_values))
        return NULL;
    Change changes[MAX_CHANGED];
    Py_ssize_t count;
    if (changed_since(new_values, old_values, changes, &count) != GO)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = changes[i].value;
        if (value != NULL && !PyLong_CheckExact(value) && !PyFloat_CheckExact(value)
                && !PyUnicode_CheckExact(value) && !PyBytes_CheckExact(value)
                && !PyBool_Check(value))
            return NULL;
    }
    /* held from here: the new dict's allocation may run the cyclic GC */
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_INCREF(changes[i].key);
        Py_XINCREF(changes[i].value);
    }
    PyObject *patch = PyDict_New();
    for (Py_ssize_t i = 0; patch != NULL && i < count; i++) {
        PyObject *value = changes[i].value;
        if (PyDict_SetItem(patch, changes[i].key,
                           value == NULL ? Py_None : value) < 0)
            Py_CLEAR(patch);
    }
    release_changes(changes, count);
    if (patch == NULL)
        PyErr_Clear();
    return patch;
}

/* ---------------------------------------------------------------------
 * state_record: convert.py encode_state, for a state holding no events.
 * ------------------------------------------------------------------ */

/* A scalar's plain CBOR size (c filled as value_size fills it; floats in
 * binary64, the infinities in binary16, as cbor2.dumps writes them), or
 * -1 (an exception may be set). */
static Py_ssize_t
plain_size(Change *c)
{
    if (PyFloat_CheckExact(c->value)) {
        double number = PyFloat_AS_DOUBLE(c->value);
        c->major = 8;
        if (isinf(number)) {
            c->number[0] = 0xf9;
            c->number[1] = number > 0 ? 0x7c : 0xfc;
            c->number[2] = 0x00;
            c->argument = 3;
            return 3;
        }
        uint64_t bits;
        memcpy(&bits, &number, 8);
        c->number[0] = 0xfb;
        for (int i = 0; i < 8; i++)
            c->number[1 + i] = (unsigned char)(bits >> (56 - 8 * i));
        c->argument = 9;
        return 9;
    }
    return value_size(c);
}

/* encode_state(state): new bytes, or NULL without an exception where the
 * Python code must write it (events held, a value not a scalar). */
PyObject *
state_record(const State *st, PyObject *state)
{
    if (Py_TYPE(state) != st->state_type)
        return NULL;
    PyObject *values = SLOT(state, st->ds.values);
    PyObject *events = SLOT(state, st->ds.events);
    uint64_t base;
    if (values == NULL || !PyDict_CheckExact(values) || events == NULL
            || !PyTuple_CheckExact(events) || PyTuple_GET_SIZE(events) != 0
            || as_u64(SLOT(state, st->ds.event_base), &base) < 0)
        return NULL;
    Py_ssize_t count = PyDict_GET_SIZE(values);
    if (count > MAX_CHANGED)
        return NULL;
    Change items[MAX_CHANGED];
    /* {1: base, 2: [], 0: values}, or without 0 when there are none */
    Py_ssize_t total = 1 + 1 + head_size(base) + 2
        + (count ? 1 + head_size((uint64_t)count) : 0);
    Py_ssize_t pos = 0, n = 0;
    PyObject *key, *value;
    while (PyDict_Next(values, &pos, &key, &value)) {
        Change *c = &items[n++];
        c->key = key;
        c->value = value;
        Py_ssize_t size;
        if (!PyUnicode_CheckExact(key)
                || (c->text = PyUnicode_AsUTF8AndSize(key, &c->text_size)) == NULL
                || (size = plain_size(c)) < 0) {
            PyErr_Clear();
            return NULL;
        }
        total += head_size((uint64_t)c->text_size) + c->text_size + size;
    }
    PyObject *record = PyBytes_FromStringAndSize(NULL, total);
    if (record == NULL) {
        PyErr_Clear();
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(record);
    *p++ = count ? 0xa3 : 0xa2;
    *p++ = 0x01;
    p = write_head(p, 0, base);
    *p++ = 0x02;
    *p++ = 0x80;
    if (count) {
        *p++ = 0x00;
        p = write_head(p, 5, (uint64_t)count);
    }
    for (Py_ssize_t i = 0; i < n; i++)
        p = write_entry(p, &items[i]);
    return record;
}
