/*
 * broker/ssp/_speedups_cbor.c: the diff, decoded and applied
 * (broker/ssp/device_state.py DeviceState.apply, _apply_patch,
 * _apply_events and freeze; broker/ssp/cbor.py OneItemDecoder).
 *
 * The strict way: definite lengths, no tags, no duplicate keys, no
 * trailing bytes, valid UTF-8, no NaN, the diff keys 0, 1 and 2 as small
 * unsigned integers. Anything else is handed over: Python decides
 * (BAD_DIFF, a tag 55799, keys 0.0 or false, a gap...). Values and events
 * are frozen as freeze() freezes them: arrays become tuples, maps
 * read-only mappings (the shared empty one for {}), containers at most
 * MAX_DEPTH deep.
 */

#include "_speedups.h"

/* One item's head: its major type and argument; -1 for a reserved or
 * indefinite length (additional information 28..31) or truncated input. */
static int
cbor_head(const unsigned char **p, const unsigned char *end, int *major,
          int *info, uint64_t *argument)
{
    if (*p >= end)
        return -1;
    unsigned char first = *(*p)++;
    *major = first >> 5;
    *info = first & 0x1F;
    if (*info < 24) {
        *argument = (uint64_t)*info;
        return 0;
    }
    if (*info > 27)
        return -1;
    int size = 1 << (*info - 24);  /* 1, 2, 4 or 8 bytes */
    if (end - *p < size)
        return -1;
    uint64_t value = 0;
    for (int i = 0; i < size; i++)
        value = (value << 8) | (*p)[i];
    *p += size;
    *argument = value;
    return 0;
}

/* A text string's body after its head (new reference), NULL to hand over
 * (with an exception set if one occurred). */
static PyObject *
cbor_text(const unsigned char **p, const unsigned char *end,
          uint64_t length)
{
    if (length > (uint64_t)(end - *p))
        return NULL;
    const char *start = (const char *)*p;
    *p += length;
    return PyUnicode_DecodeUTF8(start, (Py_ssize_t)length, "strict");
}

static PyObject *cbor_item(const State *st, const unsigned char **p,
                           const unsigned char *end, long depth);

/* An array of frozen items: tuple([freeze(item, depth + 1) ...]). */
static PyObject *
cbor_array(const State *st, const unsigned char **p,
           const unsigned char *end, uint64_t count, long depth)
{
    if (count > (uint64_t)(end - *p))
        return NULL;  /* each item takes a byte at least */
    PyObject *tuple = PyTuple_New((Py_ssize_t)count);
    if (tuple == NULL)
        return NULL;
    for (uint64_t i = 0; i < count; i++) {
        PyObject *item = cbor_item(st, p, end, depth + 1);
        if (item == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, (Py_ssize_t)i, item);
    }
    return tuple;
}

/* A map of text keys to items as a plain dict (depth: of its items), its
 * duplicate keys refused (cbor.py: allow_duplicate_keys=False); items
 * frozen, or scalars and None only when `frozen` is 0 (the values patch,
 * whose containers _apply_patch freezes at depth 0). */
static PyObject *
cbor_map(const State *st, const unsigned char **p, const unsigned char *end,
         uint64_t count, long depth)
{
    int major, info;
    uint64_t length;
    if (count > (uint64_t)(end - *p) / 2)
        return NULL;  /* each pair takes two bytes at least */
    PyObject *map = PyDict_New();
    if (map == NULL)
        return NULL;
    for (uint64_t i = 0; i < count; i++) {
        /* freeze: "map keys must be text"; _apply_patch: "value key is
         * a ..., not text" */
        if (cbor_head(p, end, &major, &info, &length) < 0 || major != 3)
            goto hand_over;
        PyObject *key = cbor_text(p, end, length);
        if (key == NULL)
            goto hand_over;
        PyObject *value = cbor_item(st, p, end, depth);
        if (value == NULL) {
            Py_DECREF(key);
            goto hand_over;
        }
        Py_ssize_t before = PyDict_GET_SIZE(map);
        int failed = PyDict_SetItem(map, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed < 0 || PyDict_GET_SIZE(map) == before)
            goto hand_over;  /* a duplicate key */
    }
    return map;
hand_over:
    Py_DECREF(map);
    return NULL;
}

/* One item, frozen as freeze(value, depth) freezes it (new reference;
 * Py_None for null, which only the caller knows whether to allow), NULL
 * to hand over (with an exception set if one occurred). */
static PyObject *
cbor_item(const State *st, const unsigned char **p, const unsigned char *end,
          long depth)
{
    int major, info;
    uint64_t argument;
    const unsigned char *start = *p;
    if (cbor_head(p, end, &major, &info, &argument) < 0)
        return NULL;
    switch (major) {
    case 0:
        return PyLong_FromUnsignedLongLong(argument);
    case 1:
        /* -1 - argument, which may pass int64 (at least -2**64: in range) */
        if (argument <= (uint64_t)INT64_MAX)
            return PyLong_FromLongLong(-1 - (long long)argument);
        else {
            PyObject *n = PyLong_FromUnsignedLongLong(argument);
            if (n == NULL)
                return NULL;
            PyObject *result = PyNumber_Invert(n);
            Py_DECREF(n);
            return result;
        }
    case 2: {
        if (argument > (uint64_t)(end - *p))
            return NULL;
        const char *body = (const char *)*p;
        *p += argument;
        return PyBytes_FromStringAndSize(body, (Py_ssize_t)argument);
    }
    case 3:
        return cbor_text(p, end, argument);
    case 4:
        /* freeze: depth >= MAX_DEPTH, "nested deeper than" */
        if (depth >= st->max_depth)
            return NULL;
        return cbor_array(st, p, end, argument, depth);
    case 5: {
        if (depth >= st->max_depth)
            return NULL;
        if (argument == 0)
            return Py_NewRef(st->empty_map);  /* freeze: shared _EMPTY_MAP */
        PyObject *map = cbor_map(st, p, end, argument, depth + 1);
        if (map == NULL)
            return NULL;
        PyObject *proxy = PyDictProxy_New(map);  /* MappingProxyType */
        Py_DECREF(map);
        return proxy;
    }
    case 7: {
        double value;
        switch (info) {
        case 20: Py_RETURN_FALSE;
        case 21: Py_RETURN_TRUE;
        case 22: Py_RETURN_NONE;
        case 25: value = PyFloat_Unpack2((const char *)start + 1, 0); break;
        case 26: value = PyFloat_Unpack4((const char *)start + 1, 0); break;
        case 27: value = PyFloat_Unpack8((const char *)start + 1, 0); break;
        default: return NULL;  /* undefined, simple values: freeze refuses */
        }
        if (value == -1.0 && PyErr_Occurred())
            return NULL;
        if (isnan(value))
            return NULL;  /* freeze: "NaN is not allowed" */
        return PyFloat_FromDouble(value);
    }
    default:
        return NULL;  /* tags: Python decides (55799 is allowed) */
    }
}

/* _apply_patch(patch): the reference's values with the patch at *p
 * merged in (a new dict, or no_values when empty); NULL to hand over.
 * A null deletes (values.pop(key, None)), anything else is set. */
static PyObject *
apply_patch(const State *st, const unsigned char **p,
            const unsigned char *end, PyObject *old_values)
{
    int major, info;
    uint64_t count;
    /* _apply_patch: "values (key 0) is not a map" */
    if (cbor_head(p, end, &major, &info, &count) < 0 || major != 5)
        return NULL;
    /* freeze(value) at depth 0 for each value: the patch's items are one
     * level down the patch map, at depth 0 of their own */
    PyObject *patch = cbor_map(st, p, end, count, 0);
    if (patch == NULL)
        return NULL;
    /* values = self._values.copy(), then each key in turn */
    PyObject *values = PyDict_Copy(old_values);
    if (values == NULL) {
        Py_DECREF(patch);
        return NULL;
    }
    Py_ssize_t position = 0;
    PyObject *name, *value;
    while (PyDict_Next(patch, &position, &name, &value)) {
        int failed;
        if (value == Py_None) {
            failed = PyDict_Contains(values, name);
            if (failed > 0)
                failed = PyDict_DelItem(values, name);
        }
        else
            failed = PyDict_SetItem(values, name, value);
        if (failed < 0) {
            Py_DECREF(values);
            Py_DECREF(patch);
            return NULL;
        }
    }
    Py_DECREF(patch);
    /* return values or _NO_VALUES */
    if (PyDict_GET_SIZE(values) == 0) {
        Py_DECREF(values);
        return Py_NewRef(st->no_values);
    }
    return values;
}

/* _apply_events(body): (base, events) from the reference's and the
 * diff's first index and events (new references); -1 to hand over. */
static int
apply_events(const State *st, PyObject *reference, PyObject *first_object,
             uint64_t first, PyObject *added, PyObject **base_out,
             PyObject **events_out)
{
    uint64_t base;
    PyObject *values = SLOT(reference, st->ds.values);
    PyObject *events = SLOT(reference, st->ds.events);
    PyObject *base_object = SLOT(reference, st->ds.event_base);
    if (values == NULL || events == NULL || !PyTuple_CheckExact(events)
            || as_u64(base_object, &base) < 0
            || base > UINT64_MAX_VALUE - (uint64_t)PyTuple_GET_SIZE(events))
        return -1;
    /* end = self._event_base + len(self._events) */
    uint64_t end = base + (uint64_t)PyTuple_GET_SIZE(events);
    if (first == end) {
        /* return self._event_base, self._events + added (the base held
         * across the allocation: the GC may run code) */
        *base_out = Py_NewRef(base_object);
        *events_out = PySequence_Concat(events, added);
        if (*events_out == NULL) {
            Py_CLEAR(*base_out);
            return -1;
        }
        return 0;
    }
    /* first > end and self._is_blank(): not self._values, event_base 0,
     * no events: return first, added. Else a gap or an overlap. */
    if (first > end && PyDict_CheckExact(values)
            && PyDict_GET_SIZE(values) == 0 && base == 0
            && PyTuple_GET_SIZE(events) == 0) {
        *events_out = Py_NewRef(added);
        *base_out = Py_NewRef(first_object);
        return 0;
    }
    return -1;
}

/* DeviceState._make(values, events, event_base), stealing the three (so
 * they are held across the allocation, which may run the cyclic GC). */
PyObject *
make_state(const State *st, PyObject *values, PyObject *events,
           PyObject *base)
{
    PyObject *state = st->state_type->tp_alloc(st->state_type, 0);
    if (state == NULL) {
        Py_DECREF(values);
        Py_DECREF(events);
        Py_DECREF(base);
        return NULL;
    }
    SLOT(state, st->ds.values) = values;
    SLOT(state, st->ds.events) = events;
    SLOT(state, st->ds.event_base) = base;
    return state;
}

/* DeviceState.apply(diff) for a diff C decodes: sets w->new_state (the
 * reference itself when nothing changes) or hands over. */
int
apply_diff(const State *st, Work *w)
{
    const unsigned char *p = w->inst.diff, *end = p + w->inst.diff_len;
    PyObject *reference = w->reference;
    PyObject *patch_values = NULL, *first_object = NULL, *added = NULL;
    PyObject *base = NULL, *events = NULL;
    uint64_t count, first = 0;
    int major, info, seen = 0;
    /* apply: "diff is a ..., not a map" (of the keys 0, 1 and 2 at most) */
    if (cbor_head(&p, end, &major, &info, &count) < 0 || major != 5
            || count > 3)
        return HAND_OVER;
    PyObject *old_values = SLOT(reference, st->ds.values);
    if (old_values == NULL || !PyDict_CheckExact(old_values))
        return HAND_OVER;
    /* held: the patch allocates (the GC may run code) */
    Py_INCREF(old_values);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t key, length;
        /* apply: type(key) is not int or key not in _DIFF_KEYS (also 0.0
         * or false, which get() would find: Python decides) */
        if (cbor_head(&p, end, &major, &info, &key) < 0 || major != 0
                || key > 2 || seen & (1 << key))
            goto hand_over;
        seen |= 1 << key;
        if (key == 0) {
            if ((patch_values = apply_patch(st, &p, end, old_values)) == NULL)
                goto hand_over;
        }
        else if (key == 1) {
            /* _apply_events: "first event index is not a uint64" */
            if (cbor_head(&p, end, &major, &info, &first) < 0 || major != 0
                    || (first_object = PyLong_FromUnsignedLongLong(first))
                       == NULL)
                goto hand_over;
        }
        else {
            /* _apply_events: "events (key 2) is not an array"; then
             * tuple([freeze(event) for event in raw]) */
            if (cbor_head(&p, end, &major, &info, &length) < 0 || major != 4
                    || length > (uint64_t)(end - p))
                goto hand_over;
            if ((added = PyTuple_New((Py_ssize_t)length)) == NULL)
                goto hand_over;
            for (uint64_t index = 0; index < length; index++) {
                PyObject *event = cbor_item(st, &p, end, 0);
                if (event == NULL)
                    goto hand_over;
                PyTuple_SET_ITEM(added, (Py_ssize_t)index, event);
                if (event == Py_None)
                    goto hand_over;  /* freeze: "null is only allowed..." */
            }
        }
    }
    if (p != end)
        goto hand_over;  /* OneItemDecoder: bytes after the item */
    if (count == 0) {
        /* apply: no key 0, 1 or 2: nothing changes (ACK_REQUEST_DIFF) */
        Py_DECREF(old_values);
        w->new_state = Py_NewRef(reference);
        return GO;
    }
    if (seen & 6) {
        /* _apply_events: "keys 1 (first event) and 2 (events) go
         * together"; "event index would exceed 2**64 - 1" */
        if (seen != 6 && seen != 7)
            goto hand_over;
        if (first > UINT64_MAX_VALUE - (uint64_t)PyTuple_GET_SIZE(added))
            goto hand_over;
        if (apply_events(st, reference, first_object, first, added, &base,
                         &events) < 0)
            goto hand_over;
    }
    else {
        base = Py_XNewRef(SLOT(reference, st->ds.event_base));
        events = Py_XNewRef(SLOT(reference, st->ds.events));
        if (base == NULL || events == NULL)
            goto hand_over;
    }
    if (patch_values == NULL)
        patch_values = Py_NewRef(old_values);  /* no key 0: self._values */
    Py_CLEAR(first_object);
    Py_CLEAR(added);
    /* apply: values is self._values and events is self._events and base
     * == self._event_base: return self (the event base is the same object
     * whenever it is equal: it is the reference's own, or first > end) */
    if (patch_values == old_values
            && events == SLOT(reference, st->ds.events)
            && base == SLOT(reference, st->ds.event_base)) {
        Py_DECREF(patch_values);
        Py_DECREF(events);
        Py_DECREF(base);
        Py_DECREF(old_values);
        w->new_state = Py_NewRef(reference);
        return GO;
    }
    Py_DECREF(old_values);
    w->new_state = make_state(st, patch_values, events, base);
    return w->new_state == NULL ? HAND_OVER : GO;
hand_over:
    Py_DECREF(old_values);
    Py_XDECREF(patch_values);
    Py_XDECREF(first_object);
    Py_XDECREF(added);
    Py_XDECREF(base);
    Py_XDECREF(events);
    return HAND_OVER;
}
