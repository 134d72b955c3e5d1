/*
 * broker/registry/_speedups.c: the registry's per-update encoding in C.
 *
 * Why: every durable update appends an entry to its device's history and,
 * at the commit, encodes the device's row; in Python those two cost about
 * 2 and 1.4 us, a tenth of the broker's work per update (issue #5).
 *
 * What, each the usual case of a Python function that stays the reference
 * and takes every other case (this code hands over before it makes
 * anything):
 *
 *   append_entry(history, version, cursor, at, kind, data, size, budget)
 *       History.appended (history.py) of an entry encode_entry writes by
 *       hand (a map of text keys to numbers and bools), to a history that
 *       has not been weighed and stays far from its budget;
 *   encode_device(dev)
 *       database.encode_device of a device whose maps hold text keys,
 *       numbers and times, whose connection facts are scalars and whose
 *       history is a History.
 *
 * Both return exactly the Python code's bytes (tests/registry/
 * test_speedups.py compares them on generated devices and histories).
 * The module imports no broker module: broker/registry/speedups.py gives
 * it, once, the classes (their __slots__ are read and written by offset
 * after an exact type check), the constants and the two Python functions.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../ssp/_speedups_slots.h"

/* Device's slots this code reads, in encode_state's order. */
enum { RKEYS, RVALS, RTIMES, DKEYS, DVALS, DTIMES, ONLINE, LAST_HEARD, ADDRESS,
       RTT, SESSION_ID, HISTORY, DEVICE_SLOTS };

static const char *const device_slot_names[DEVICE_SLOTS] = {
    "rkeys", "rvals", "rtimes", "dkeys", "dvals", "dtimes", "online",
    "last_heard", "address", "rtt", "session_id", "history"};

typedef struct {
    int ready;
    PyTypeObject *history_class;
    PyTypeObject *frozen_map_class;
    PyTypeObject *device_class;
    PyObject *appended;             /* History.appended: the reference */
    PyObject *encode_device;        /* database.encode_device: the reference */
    Py_ssize_t stored_offset, weights_offset;
    Py_ssize_t device_offsets[DEVICE_SLOTS];
    long long json_per_byte, entry_overhead, heads;
    unsigned char float64_tag;
} State;

static State *
get_state(PyObject *module)
{
    return (State *)PyModule_GetState(module);
}

/* ---------------------------------------------------------------------
 * An output buffer: on the stack while small, on the heap after.
 * ------------------------------------------------------------------ */

typedef struct {
    unsigned char *data;
    Py_ssize_t len, cap;
    unsigned char small[1024];
} Out;

static void
out_init(Out *o)
{
    o->data = o->small;
    o->len = 0;
    o->cap = sizeof(o->small);
}

static void
out_free(Out *o)
{
    if (o->data != o->small)
        PyMem_Free(o->data);
}

static int
out_reserve(Out *o, Py_ssize_t extra)
{
    if (extra <= o->cap - o->len)
        return 0;
    if (extra > PY_SSIZE_T_MAX / 2 - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = o->cap * 2;
    if (cap < o->len + extra)
        cap = o->len + extra;
    unsigned char *grown;
    if (o->data == o->small) {
        grown = PyMem_Malloc(cap);
        if (grown != NULL)
            memcpy(grown, o->small, o->len);
    }
    else {
        grown = PyMem_Realloc(o->data, cap);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->data = grown;
    o->cap = cap;
    return 0;
}

static int
put(Out *o, const void *bytes, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->data + o->len, bytes, n);
    o->len += n;
    return 0;
}

static int
put_byte(Out *o, unsigned char b)
{
    return put(o, &b, 1);
}

static void
store_be(unsigned char *at, uint64_t n, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        at[i] = (unsigned char)(n & 0xff);
        n >>= 8;
    }
}

/* The shortest CBOR head of major type ``major`` (shifted) and argument
 * ``n``: history_entry.cbor_head. */
static int
put_head(Out *o, unsigned char major, uint64_t n)
{
    unsigned char head[9];
    int width;
    if (n < 24) {
        head[0] = major | (unsigned char)n;
        return put(o, head, 1);
    }
    if (n < 0x100) {
        head[0] = major | 24;
        width = 1;
    }
    else if (n < 0x10000) {
        head[0] = major | 25;
        width = 2;
    }
    else if (n < 0x100000000ULL) {
        head[0] = major | 26;
        width = 4;
    }
    else {
        head[0] = major | 27;
        width = 8;
    }
    store_be(head + 1, n, width);
    return put(o, head, 1 + width);
}

/* ``lead`` then the double's bits, big-endian (struct ">Bd"). */
static int
put_double(Out *o, unsigned char lead, double value)
{
    unsigned char item[9];
    uint64_t bits;
    memcpy(&bits, &value, sizeof bits);
    item[0] = lead;
    store_be(item + 1, bits, 8);
    return put(o, item, 9);
}

/* ---------------------------------------------------------------------
 * Items. Each returns 1 (written), 0 (not a case of this code: hand over,
 * no error set) or -1 (error set).
 * ------------------------------------------------------------------ */

/* An int as history_entry's fast paths write it: -2**64 <= n < 2**64,
 * the shortest head (the most negative quarter is left to Python). */
static int
put_int(Out *o, PyObject *value)
{
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow == 0) {
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (n >= 0)
            return put_head(o, 0x00, (uint64_t)n) < 0 ? -1 : 1;
        return put_head(o, 0x20, (uint64_t)(-1 - n)) < 0 ? -1 : 1;
    }
    if (overflow < 0)
        return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(value);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();                  /* 2**64 or more */
        return 0;
    }
    return put_head(o, 0x00, u) < 0 ? -1 : 1;
}

/* A str as its CBOR text (UTF-8); ``ascii_only``: hand over any other. */
static int
put_text(Out *o, PyObject *text, int ascii_only)
{
    if (!PyUnicode_CheckExact(text))
        return 0;
    if (PyUnicode_IS_ASCII(text)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        if (put_head(o, 0x60, (uint64_t)n) < 0 || put(o, PyUnicode_DATA(text), n) < 0)
            return -1;
        return 1;
    }
    if (ascii_only)
        return 0;
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &n);
    if (utf8 == NULL) {
        PyErr_Clear();                  /* lone surrogates: Python raises */
        return 0;
    }
    if (put_head(o, 0x60, (uint64_t)n) < 0 || put(o, utf8, n) < 0)
        return -1;
    return 1;
}

/* database._scalar: a float, None, a bool, an int or a str. */
static int
put_scalar(Out *o, PyObject *value)
{
    if (PyFloat_CheckExact(value))
        return put_double(o, 0xfb, PyFloat_AS_DOUBLE(value)) < 0 ? -1 : 1;
    if (value == Py_None)
        return put_byte(o, 0xf6) < 0 ? -1 : 1;
    if (value == Py_True || value == Py_False)
        return put_byte(o, value == Py_True ? 0xf5 : 0xf4) < 0 ? -1 : 1;
    if (PyLong_CheckExact(value))
        return put_int(o, value);
    return put_text(o, value, 0);
}

/* A tuple of floats as one float64 typed array (database._array_packer),
 * else as an array of numbers (database._numbers). */
static int
put_numbers(const State *st, Out *o, PyObject *items)
{
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    int floats = 1;
    for (Py_ssize_t i = 0; i < n && floats; i++)
        floats = PyFloat_CheckExact(PyTuple_GET_ITEM(items, i));
    if (floats) {
        if (n > 0xffff / 8)
            return 0;                   /* Python's two length bytes overflow */
        unsigned char head[5] = {0xd8, st->float64_tag};
        Py_ssize_t size = 8 * n, used;
        if (size < 24) {
            head[2] = 0x40 | (unsigned char)size;
            used = 3;
        }
        else if (size < 0x100) {
            head[2] = 0x58;
            head[3] = (unsigned char)size;
            used = 4;
        }
        else {
            head[2] = 0x59;
            store_be(head + 3, (uint64_t)size, 2);
            used = 5;
        }
        if (put(o, head, used) < 0 || out_reserve(o, size) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            double value = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(items, i));
            uint64_t bits;
            memcpy(&bits, &value, sizeof bits);
            store_be(o->data + o->len, bits, 8);
            o->len += 8;
        }
        return 1;
    }
    if (put_head(o, 0x80, (uint64_t)n) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        int done;
        if (PyFloat_CheckExact(item))
            done = put_double(o, 0xfb, PyFloat_AS_DOUBLE(item)) < 0 ? -1 : 1;
        else if (PyLong_CheckExact(item))
            done = put_int(o, item);
        else
            return 0;                   /* cbor2's, for the whole array */
        if (done != 1)
            return done;
    }
    return 1;
}

/* database._map_cbor: a map kept as parallel tuples, three arrays. */
static int
put_map(const State *st, Out *o, PyObject *keys, PyObject *values, PyObject *times)
{
    if (!PyTuple_CheckExact(keys) || !PyTuple_CheckExact(values) || !PyTuple_CheckExact(times))
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n == 0)
        return put(o, "\x80\x80\x80", 3) < 0 ? -1 : 1;
    /* Python packs len(keys) values and times (or reads only the first). */
    if (PyTuple_GET_SIZE(values) != n || PyTuple_GET_SIZE(times) != n)
        return 0;
    if (put_head(o, 0x80, (uint64_t)n) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        int done = put_text(o, PyTuple_GET_ITEM(keys, i), 0);
        if (done != 1)
            return done;
    }
    int done = put_numbers(st, o, values);
    if (done != 1)
        return done;
    return put_numbers(st, o, times);
}

/* Whether the int ``value`` is 0 <= value < 2**64 (then in ``*n``). */
static int
as_uint64(PyObject *value, unsigned long long *n)
{
    *n = PyLong_AsUnsignedLongLong(value);
    if (*n == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();                  /* negative, or 2**64 or more */
        return 0;
    }
    return 1;
}

/* history_entry.encode_entry of a map of text keys to numbers and bools
 * at a finite time. */
static int
put_entry(const State *st, Out *o, PyObject *version, PyObject *cursor, PyObject *at,
          PyObject *kind, PyObject *data)
{
    if (!PyLong_CheckExact(version) || !PyLong_CheckExact(cursor)
            || !PyFloat_CheckExact(at) || !isfinite(PyFloat_AS_DOUBLE(at))
            || !(PyDict_CheckExact(data) || Py_IS_TYPE(data, st->frozen_map_class)))
        return 0;
    unsigned long long v, c;
    if (!as_uint64(version, &v) || !as_uint64(cursor, &c))
        return 0;
    if (put_byte(o, 0x85) < 0 || put_head(o, 0x00, v) < 0 || put_head(o, 0x00, c) < 0
            || put_double(o, 0xfb, PyFloat_AS_DOUBLE(at)) < 0)
        return -1;
    int done = put_text(o, kind, 1);
    if (done != 1)
        return done;
    if (put_head(o, 0xa0, (uint64_t)PyDict_GET_SIZE(data)) < 0)
        return -1;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(data, &pos, &key, &value)) {
        done = put_text(o, key, 1);
        if (done != 1)
            return done;
        if (value == Py_True || value == Py_False)
            done = put_byte(o, value == Py_True ? 0xf5 : 0xf4) < 0 ? -1 : 1;
        else if (PyFloat_CheckExact(value))
            done = isfinite(PyFloat_AS_DOUBLE(value))
                ? (put_double(o, 0xfb, PyFloat_AS_DOUBLE(value)) < 0 ? -1 : 1) : 0;
        else if (PyLong_CheckExact(value))
            done = put_int(o, value);
        else
            done = 0;
        if (done != 1)
            return done;
    }
    return 1;
}

/* ---------------------------------------------------------------------
 * CBOR heads of the stored history (an array of byte strings).
 * ------------------------------------------------------------------ */

/* The argument of the head of major type ``major`` at ``*pos`` in
 * data[0:len], moving ``*pos`` past the head; -1 if it is not one. */
static int64_t
read_head(const unsigned char *data, Py_ssize_t len, Py_ssize_t *pos, unsigned char major)
{
    if (*pos >= len || (data[*pos] & 0xe0) != major)
        return -1;
    unsigned char info = data[*pos] & 0x1f;
    if (info < 24) {
        *pos += 1;
        return info;
    }
    if (info > 27)
        return -1;
    int width = 1 << (info - 24);
    if (len - *pos - 1 < width)
        return -1;
    uint64_t n = 0;
    for (int i = 1; i <= width; i++)
        n = (n << 8) | data[*pos + i];
    if (n > (uint64_t)PY_SSIZE_T_MAX)
        return -1;
    *pos += 1 + width;
    return (int64_t)n;
}

/* A History of ``stored``, unweighed: what History.__init__(stored) makes
 * (it only sets the two slots). */
static PyObject *
new_history(const State *st, PyObject *stored)
{
    PyObject *history = st->history_class->tp_alloc(st->history_class, 0);
    if (history == NULL)
        return NULL;
    Py_INCREF(stored);
    *(PyObject **)((char *)history + st->stored_offset) = stored;
    Py_INCREF(Py_None);
    *(PyObject **)((char *)history + st->weights_offset) = Py_None;
    return history;
}

/* The new History, NULL with an error, or Py_None (borrowed) to hand over. */
static PyObject *
append_fast(const State *st, PyObject *const *args)
{
    PyObject *history = args[0];
    if (!Py_IS_TYPE(history, st->history_class))
        return Py_None;
    PyObject *stored = *(PyObject **)((char *)history + st->stored_offset);
    PyObject *weights = *(PyObject **)((char *)history + st->weights_offset);
    if (stored == NULL || !PyBytes_CheckExact(stored) || weights != Py_None
            || !PyLong_CheckExact(args[6]) || !PyLong_CheckExact(args[7]))
        return Py_None;
    long long size = PyLong_AsLongLong(args[6]);
    long long budget = size == -1 && PyErr_Occurred() ? -1 : PyLong_AsLongLong(args[7]);
    if (budget == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return Py_None;
    }
    if (size < 1 || budget < 0 || budget > ((long long)1 << 40))
        return Py_None;

    Out entry;
    out_init(&entry);
    int done = put_entry(st, &entry, args[1], args[2], args[3], args[4], args[5]);
    if (done != 1) {
        out_free(&entry);
        return done < 0 ? NULL : Py_None;
    }
    long long n = entry.len;
    if (n * st->json_per_byte + st->entry_overhead > (budget >> 2)) {
        out_free(&entry);               /* it may weigh over a quarter */
        return Py_None;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(stored);
    Py_ssize_t len = PyBytes_GET_SIZE(stored), start = 0;
    int64_t held = read_head(data, len, &start, 0x80);
    long long count = held + 1;
    /* (every entry takes a byte at least: a larger count is not a history
     * this code made, and the sums below must not overflow) */
    if (held < 0 || held > len - start
            || (len - start + n) * st->json_per_byte + count * st->entry_overhead
               > budget - st->heads) {
        out_free(&entry);               /* near the budget: weighed in Python */
        return Py_None;
    }
    for (; count > size; count--) {
        int64_t skip = read_head(data, len, &start, 0x40);
        if (skip < 0 || skip > len - start) {
            out_free(&entry);
            return Py_None;
        }
        start += (Py_ssize_t)skip;
    }

    Out whole;
    out_init(&whole);
    PyObject *result = NULL;
    if (put_head(&whole, 0x80, (uint64_t)count) == 0
            && put(&whole, data + start, len - start) == 0
            && put_head(&whole, 0x40, (uint64_t)n) == 0
            && put(&whole, entry.data, entry.len) == 0) {
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)whole.data, whole.len);
        if (bytes != NULL) {
            result = new_history(st, bytes);
            Py_DECREF(bytes);
        }
    }
    out_free(&whole);
    out_free(&entry);
    return result;
}

static PyObject *
append_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const State *st = get_state(module);
    if (!st->ready) {
        PyErr_SetString(PyExc_RuntimeError, "setup() has not been called");
        return NULL;
    }
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "append_entry takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *result = append_fast(st, args);
    if (result != Py_None)
        return result;
    PyObject *reference = Py_NewRef(st->appended);    /* (setup() may run meanwhile) */
    result = PyObject_Vectorcall(reference, args, 8, NULL);
    Py_DECREF(reference);
    return result;
}

/* The row, NULL with an error, or Py_None (borrowed) to hand over. */
static PyObject *
encode_fast(const State *st, PyObject *dev)
{
    if (!Py_IS_TYPE(dev, st->device_class))
        return Py_None;
    PyObject *slot[DEVICE_SLOTS];
    for (int i = 0; i < DEVICE_SLOTS; i++) {
        slot[i] = *(PyObject **)((char *)dev + st->device_offsets[i]);
        if (slot[i] == NULL)
            return Py_None;             /* unset: Python's AttributeError */
    }
    PyObject *history = slot[HISTORY], *address = slot[ADDRESS];
    if (!Py_IS_TYPE(history, st->history_class))
        return Py_None;
    PyObject *stored = *(PyObject **)((char *)history + st->stored_offset);
    if (stored == NULL || !PyBytes_CheckExact(stored)
            || (address != Py_None
                && (!PyTuple_CheckExact(address) || PyTuple_GET_SIZE(address) != 2)))
        return Py_None;

    Out o;
    out_init(&o);
    int done = put_byte(&o, 0x8c) < 0 ? -1 : 1;
    if (done == 1)
        done = put_map(st, &o, slot[RKEYS], slot[RVALS], slot[RTIMES]);
    if (done == 1)
        done = put_map(st, &o, slot[DKEYS], slot[DVALS], slot[DTIMES]);
    if (done == 1)
        done = put_scalar(&o, slot[ONLINE]);
    if (done == 1)
        done = put_scalar(&o, slot[LAST_HEARD]);
    if (done == 1) {
        if (address == Py_None) {
            done = put_byte(&o, 0xf6) < 0 ? -1 : 1;
        }
        else {
            done = put_byte(&o, 0x82) < 0 ? -1 : 1;
            if (done == 1)
                done = put_scalar(&o, PyTuple_GET_ITEM(address, 0));
            if (done == 1)
                done = put_scalar(&o, PyTuple_GET_ITEM(address, 1));
        }
    }
    if (done == 1)
        done = put_scalar(&o, slot[RTT]);
    if (done == 1)
        done = put_scalar(&o, slot[SESSION_ID]);
    if (done == 1)
        done = put(&o, PyBytes_AS_STRING(stored), PyBytes_GET_SIZE(stored)) < 0 ? -1 : 1;
    PyObject *row = done == 1
        ? PyBytes_FromStringAndSize((const char *)o.data, o.len)
        : done == 0 ? Py_None : NULL;
    out_free(&o);
    return row;
}

static PyObject *
encode_device(PyObject *module, PyObject *dev)
{
    const State *st = get_state(module);
    if (!st->ready) {
        PyErr_SetString(PyExc_RuntimeError, "setup() has not been called");
        return NULL;
    }
    PyObject *row = encode_fast(st, dev);
    if (row != Py_None)
        return row;
    PyObject *reference = Py_NewRef(st->encode_device);
    row = PyObject_CallOneArg(reference, dev);
    Py_DECREF(reference);
    return row;
}

/* ---------------------------------------------------------------------
 * setup(): the classes, constants and reference functions, once.
 * ------------------------------------------------------------------ */

static int
require_class(PyObject *cls, const char *what)
{
    if (PyType_Check(cls))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s must be a class", what);
    return -1;
}

static long long
int_setting(PyObject *value, const char *what)
{
    long long n = PyLong_AsLongLong(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 0 || n > 0xffff) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return -1;
    }
    return n;
}

static PyObject *
setup(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"history_class", "frozen_map_class", "device_class",
                            "appended", "encode_device", "json_per_byte",
                            "entry_overhead", "heads", "float64_tag", NULL};
    PyObject *history_class, *frozen_map_class, *device_class, *appended, *encoder;
    PyObject *json_per_byte, *entry_overhead, *heads, *tag;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOOOO", names, &history_class,
                                     &frozen_map_class, &device_class, &appended, &encoder,
                                     &json_per_byte, &entry_overhead, &heads, &tag))
        return NULL;
    if (require_class(history_class, "history_class") < 0
            || require_class(frozen_map_class, "frozen_map_class") < 0
            || require_class(device_class, "device_class") < 0)
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)frozen_map_class, &PyDict_Type)) {
        PyErr_SetString(PyExc_TypeError, "frozen_map_class must be a dict subclass");
        return NULL;
    }
    if (!PyCallable_Check(appended) || !PyCallable_Check(encoder)) {
        PyErr_SetString(PyExc_TypeError, "appended and encode_device must be callable");
        return NULL;
    }
    State fresh = {0};
    if (slot_offset((PyTypeObject *)history_class, "stored", &fresh.stored_offset) < 0
            || slot_offset((PyTypeObject *)history_class, "weights", &fresh.weights_offset) < 0)
        return NULL;
    for (int i = 0; i < DEVICE_SLOTS; i++)
        if (slot_offset((PyTypeObject *)device_class, device_slot_names[i],
                        &fresh.device_offsets[i]) < 0)
            return NULL;
    if ((fresh.json_per_byte = int_setting(json_per_byte, "json_per_byte")) < 0
            || (fresh.entry_overhead = int_setting(entry_overhead, "entry_overhead")) < 0
            || (fresh.heads = int_setting(heads, "heads")) < 0)
        return NULL;
    long long tag_value = int_setting(tag, "float64_tag");
    if (tag_value < 0)
        return NULL;
    if (tag_value >= 24 && tag_value < 0x100)
        fresh.float64_tag = (unsigned char)tag_value;
    else {
        PyErr_SetString(PyExc_ValueError, "float64_tag must take one byte after 0xd8");
        return NULL;
    }

    fresh.history_class = (PyTypeObject *)Py_NewRef(history_class);
    fresh.frozen_map_class = (PyTypeObject *)Py_NewRef(frozen_map_class);
    fresh.device_class = (PyTypeObject *)Py_NewRef(device_class);
    fresh.appended = Py_NewRef(appended);
    fresh.encode_device = Py_NewRef(encoder);
    fresh.ready = 1;
    /* The new state in place first: releasing the old one may run Python. */
    State *st = get_state(module), old = *st;
    *st = fresh;
    Py_XDECREF(old.history_class);
    Py_XDECREF(old.frozen_map_class);
    Py_XDECREF(old.device_class);
    Py_XDECREF(old.appended);
    Py_XDECREF(old.encode_device);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(*, history_class, frozen_map_class, device_class, appended, encode_device, "
     "json_per_byte, entry_overhead, heads, float64_tag): what the functions use, once."},
    {"append_entry", (PyCFunction)(void (*)(void))append_entry, METH_FASTCALL,
     "append_entry(history, version, cursor, at, kind, data, size, budget): "
     "history.appended(...), its usual case in C."},
    {"encode_device", encode_device, METH_O,
     "encode_device(dev): database.encode_device(dev), its usual case in C."},
    {NULL, NULL, 0, NULL},
};

static int
traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = get_state(module);
    Py_VISIT(st->history_class);
    Py_VISIT(st->frozen_map_class);
    Py_VISIT(st->device_class);
    Py_VISIT(st->appended);
    Py_VISIT(st->encode_device);
    return 0;
}

static int
clear(PyObject *module)
{
    State *st = get_state(module);
    st->ready = 0;
    Py_CLEAR(st->history_class);
    Py_CLEAR(st->frozen_map_class);
    Py_CLEAR(st->device_class);
    Py_CLEAR(st->appended);
    Py_CLEAR(st->encode_device);
    return 0;
}

static void
free_module(void *module)
{
    clear((PyObject *)module);
}

static struct PyModuleDef registry_speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "broker.registry._speedups",
    .m_doc = "The registry's history append and row encoding, their usual cases in C.",
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_traverse = traverse,
    .m_clear = clear,
    .m_free = free_module,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&registry_speedups);
}
