/*
 * broker/ssp/_speedups_receiver.c: the receiving half (broker/ssp/
 * receiver.py Receiver.receive and _rationalize, broker/ssp/bounds.py
 * StateBounds.check_diff and check, broker/ssp/device_state.py
 * DeviceState.subtract). check_receive changes nothing; change_receiver
 * does what receive does from "Nothing has changed so far" on.
 */

#include "_speedups.h"

/* A DeviceState's event_base (borrowed) and event_end; -1 if it is
 * not a plain DeviceState or its end passes 2**64 - 1. */
static int
event_span(const State *st, PyObject *state, PyObject **base_object,
           uint64_t *base, uint64_t *end)
{
    if (Py_TYPE(state) != st->state_type)
        return -1;
    PyObject *events = SLOT(state, st->ds.events);
    *base_object = SLOT(state, st->ds.event_base);
    if (events == NULL || !PyTuple_CheckExact(events)
            || as_u64(*base_object, base) < 0
            || *base > UINT64_MAX_VALUE - (uint64_t)PyTuple_GET_SIZE(events))
        return -1;
    *end = *base + (uint64_t)PyTuple_GET_SIZE(events);
    return 0;
}

/* A bound's limit (an exact int, at least 0): -1 otherwise. */
static long long
limit_of(PyObject *bounds, Py_ssize_t offset)
{
    PyObject *limit = SLOT(bounds, offset);
    if (limit == NULL || !PyLong_CheckExact(limit))
        return -1;
    long long value = PyLong_AsLongLong(limit);
    if (value < 0) {
        PyErr_Clear();
        return -1;
    }
    return value;
}

/* StateBounds.check(state, reference, base, diff_size, known) for
 * w->new_state: sets w->held (what it returns), or hands over when it
 * would refuse the state or encode its events (the bound passes the
 * limit: Python encodes them, and decides). base: NULL for None. */
static int
check_bounds(const State *st, Work *w, PyObject *bounds, PyObject *base,
             PyObject *known)
{
    PyObject *state = w->new_state, *reference = w->reference;
    PyObject *start_object, *unused, *later = NULL;
    uint64_t state_base, end, reference_base, reference_end, start;
    uint64_t base_base, base_end;
    /* state.value_count > self.max_values: VALUES_OVER_LIMIT */
    long long max_values = limit_of(bounds, st->b.max_values);
    PyObject *values = SLOT(state, st->ds.values);
    if (max_values < 0 || values == NULL || !PyDict_CheckExact(values)
            || PyDict_GET_SIZE(values) > max_values)
        return HAND_OVER;
    if (event_span(st, state, &start_object, &state_base, &end) < 0
            || event_span(st, reference, &unused, &reference_base,
                          &reference_end) < 0)
        return HAND_OVER;
    int known_reference = known != Py_None
        && PyTuple_GET_ITEM(known, 0) == reference;
    if (end == reference_end) {
        /* No event added: (state, known[1], known[2]) if known[0] is
         * reference, else None */
        if (known_reference)
            w->held = PyTuple_Pack(3, state, PyTuple_GET_ITEM(known, 1),
                                   PyTuple_GET_ITEM(known, 2));
        else
            w->held = Py_NewRef(Py_None);
        return w->held == NULL ? HAND_OVER : GO;
    }
    /* start = state.event_base; if base is not None and base.event_end
     * > start: start = base.event_end */
    start = state_base;
    if (base != NULL) {
        if (event_span(st, base, &unused, &base_base, &base_end) < 0)
            return HAND_OVER;
        if (base_end > start) {
            start = base_end;
            if ((later = PyLong_FromUnsignedLongLong(start)) == NULL)
                return HAND_OVER;
            start_object = later;
        }
    }
    /* end - start > self.max_events: EVENTS_OVER_LIMIT */
    long long max_events = limit_of(bounds, st->b.max_events);
    long long limit = limit_of(bounds, st->b.max_event_bytes);
    long long diff_size = (long long)w->inst.diff_len;
    if (max_events < 0 || limit < 0
            || (end > start && end - start > (uint64_t)max_events))
        goto hand_over;
    PyObject *size;
    if (reference_end <= start) {
        /* every held event came in this diff: (state, start, diff_size)
         * if diff_size <= limit */
        if (diff_size > limit)
            goto hand_over;  /* encode(state.events_since(start)) */
        if ((size = PyLong_FromLongLong(diff_size)) == NULL)
            goto hand_over;
        Py_INCREF(start_object);  /* a slot of state: held across the
                                   * allocation */
        w->held = PyTuple_Pack(3, state, start_object, size);
        Py_DECREF(start_object);
    }
    else {
        /* known is not None and known[0] is reference and known[1] <=
         * start: bound = known[2] + diff_size + _ARRAY_HEAD_GROWTH, and
         * (state, known[1], bound) if bound <= limit */
        uint64_t known_start, known_size;
        if (!known_reference
                || as_u64(PyTuple_GET_ITEM(known, 1), &known_start) < 0
                || known_start > start
                || as_u64(PyTuple_GET_ITEM(known, 2), &known_size) < 0
                || known_size > (uint64_t)limit)
            goto hand_over;  /* encode(state.events_since(start)) */
        long long bound = (long long)known_size + diff_size
            + st->array_head_growth;
        if (bound > limit)
            goto hand_over;  /* encode(state.events_since(start)) */
        if ((size = PyLong_FromLongLong(bound)) == NULL)
            goto hand_over;
        w->held = PyTuple_Pack(3, state, PyTuple_GET_ITEM(known, 1), size);
    }
    Py_DECREF(size);
    Py_XDECREF(later);
    return w->held == NULL ? HAND_OVER : GO;
hand_over:
    Py_XDECREF(later);
    return HAND_OVER;
}

/* Receiver.receive: a new newest state built on a state held. */
int
check_receive(const State *st, Work *w)
{
    const Instruction *inst = &w->inst;
    uint64_t newest, num;

    PyObject *profile = SLOT(w->sender, st->snd.profile);
    if (profile == NULL || Py_TYPE(profile) != st->profile_type)
        return HAND_OVER;
    w->profile = Py_NewRef(profile);

    PyObject *states = SLOT(w->receiver, st->rcv.states);
    if (states == NULL || !PyList_CheckExact(states))
        return HAND_OVER;
    Py_ssize_t size = PyList_GET_SIZE(states);
    if (size < 2 || size % 2)
        return HAND_OVER;
    w->states = Py_NewRef(states);
    if (as_u64(PyList_GET_ITEM(states, size - 2), &newest) < 0)
        return HAND_OVER;
    /* receive: new_num > newest_num, the usual case (else a duplicate or
     * an older state, kept out of order) */
    if (inst->new_num <= newest)
        return HAND_OVER;
    /* _process: num == UINT64_MAX, the peer's shutdown */
    if (inst->new_num == UINT64_MAX_VALUE)
        return HAND_OVER;
    /* receive: throwaway > newest_num and not borrowed (BAD_THROWAWAY) */
    if (inst->throwaway_num > newest)
        return HAND_OVER;
    /* receive: the reference is the held state numbered old_num, mostly
     * the newest (for index in range(_NUM, size, _STRIDE): ...) */
    PyObject *reference = NULL;
    if (inst->old_num == newest)
        reference = PyList_GET_ITEM(states, size - 1);
    else {
        for (Py_ssize_t index = 0; index < size - 2; index += 2) {
            if (as_u64(PyList_GET_ITEM(states, index), &num) < 0)
                return HAND_OVER;
            if (num == inst->old_num) {
                reference = PyList_GET_ITEM(states, index + 1);
                break;
            }
        }
    }
    /* receive: reference is None: the zero state, an alias, or
     * UNKNOWN_REFERENCE */
    if (reference == NULL)
        return HAND_OVER;
    /* apply/subtract/bounds are DeviceState's (another state type:
     * Python) */
    if (Py_TYPE(reference) != st->state_type)
        return HAND_OVER;
    w->reference = Py_NewRef(reference);
    if ((w->num = PyLong_FromUnsignedLongLong(inst->new_num)) == NULL)
        return HAND_OVER;

    /* receive: while keep_from < size and states[keep_from] < throwaway */
    Py_ssize_t keep_from = 0;
    while (keep_from < size) {
        if (as_u64(PyList_GET_ITEM(states, keep_from), &num) < 0)
            return HAND_OVER;
        if (num >= inst->throwaway_num)
            break;
        keep_from += 2;
    }
    w->keep_from = keep_from;

    /* receive: (size - keep_from) // _STRIDE > profile.received_states_cap */
    PyObject *cap_object = SLOT(profile, st->p.received_states_cap);
    PyObject *bounds = SLOT(profile, st->p.state_bounds);
    if (cap_object == NULL || !PyLong_CheckExact(cap_object) || bounds == NULL)
        return HAND_OVER;
    long long cap = PyLong_AsLongLong(cap_object);
    if (cap == -1 && PyErr_Occurred())
        return HAND_OVER;
    if (bounds != Py_None && Py_TYPE(bounds) != st->bounds_type)
        return HAND_OVER;
    /* held: apply_diff allocates (the GC may run code that replaces the
     * profile's bounds) */
    w->bounds = Py_NewRef(bounds);
    if ((long long)((size - keep_from) / 2) > cap) {
        /* receive: quench, or QUEUE_FULL, without state_bounds */
        if (bounds == Py_None)
            return HAND_OVER;
        w->evict = 1;  /* bounded: the oldest above the throwaway goes */
    }

    /* receive: the diff, checked by the bounds, then applied */
    if (inst->diff_len > 0) {
        if (bounds != Py_None) {
            /* StateBounds.check_diff: len(diff) > max_diff_bytes */
            long long max_diff;
            PyObject *limit = SLOT(bounds, st->b.max_diff_bytes);
            if (limit == NULL || !PyLong_CheckExact(limit))
                return HAND_OVER;
            max_diff = PyLong_AsLongLong(limit);
            if ((max_diff == -1 && PyErr_Occurred())
                    || inst->diff_len > max_diff)
                return HAND_OVER;
        }
        if (apply_diff(st, w) != GO)
            return HAND_OVER;
    }
    else
        w->new_state = Py_NewRef(reference);
    /* Python holds the list it read; code run meanwhile (the GC) must not
     * have changed it in place */
    if (PyList_GET_SIZE(states) != size)
        return HAND_OVER;

    /* receive: new_state is reference and reference is not newest (and
     * maybe equal to it: DeviceState.__eq__) */
    PyObject *newest_state = PyList_GET_ITEM(states, size - 1);
    if (w->new_state == reference && reference != newest_state)
        return HAND_OVER;
    /* receive: unchanged = new_state is newest */
    w->unchanged = w->new_state == newest_state;
    /* the held events bound (_held_events) is None or a 3-tuple */
    PyObject *known = SLOT(w->receiver, st->rcv.held_events);
    if (known == NULL || (known != Py_None
                          && !(PyTuple_CheckExact(known)
                               && PyTuple_GET_SIZE(known) == 3)))
        return HAND_OVER;
    if (bounds != Py_None && w->new_state != reference) {
        /* receive: self._held_events = bounds.check(new_state, reference,
         *     states[keep_from + _STATE] if keep_from < size else None,
         *     len(diff), self._held_events) */
        PyObject *base = keep_from < size
            ? PyList_GET_ITEM(states, keep_from + 1) : NULL;
        /* held: check_bounds allocates tuples of known's items */
        Py_INCREF(known);
        Py_XINCREF(base);
        int checked = check_bounds(st, w, bounds, base, known);
        Py_DECREF(known);
        Py_XDECREF(base);
        if (checked != GO)
            return HAND_OVER;
        w->set_held = 1;
    }
    return GO;
}

/* DeviceState.subtract(self, prefix): this state without the events the
 * prefix holds (self itself when there are none to drop). Calls the
 * Python method for anything but two plain DeviceStates. New reference. */
PyObject *
subtract(const State *st, PyObject *self, PyObject *prefix)
{
    uint64_t base, prefix_base;
    PyObject *events = NULL, *prefix_events = NULL;
    if (Py_TYPE(self) == st->state_type && Py_TYPE(prefix) == st->state_type) {
        events = SLOT(self, st->ds.events);
        prefix_events = SLOT(prefix, st->ds.events);
    }
    if (events == NULL || prefix_events == NULL || !PyTuple_CheckExact(events)
            || !PyTuple_CheckExact(prefix_events)
            || as_u64(SLOT(self, st->ds.event_base), &base) < 0
            || as_u64(SLOT(prefix, st->ds.event_base), &prefix_base) < 0
            || prefix_base > UINT64_MAX_VALUE
                             - (uint64_t)PyTuple_GET_SIZE(prefix_events)
            || base > UINT64_MAX_VALUE - (uint64_t)PyTuple_GET_SIZE(events)) {
        PyObject *args[2] = {self, prefix};
        return PyObject_VectorcallMethod(st->str_subtract, args, 2, NULL);
    }
    /* cut = prefix._event_base + len(prefix._events) */
    uint64_t cut = prefix_base + (uint64_t)PyTuple_GET_SIZE(prefix_events);
    uint64_t end = base + (uint64_t)PyTuple_GET_SIZE(events);
    if (cut <= base)
        return Py_NewRef(self);
    if (cut >= end) {
        if (PyTuple_GET_SIZE(events) == 0)
            return Py_NewRef(self);
        cut = end;
    }
    /* DeviceState._make(self._values, events[cut - base:], cut) */
    PyObject *values = SLOT(self, st->ds.values);
    if (values == NULL) {
        PyObject *args[2] = {self, prefix};
        return PyObject_VectorcallMethod(st->str_subtract, args, 2, NULL);
    }
    Py_INCREF(values);  /* held across the allocations (the GC) */
    PyObject *kept = PyTuple_GetSlice(events, (Py_ssize_t)(cut - base),
                                      PyTuple_GET_SIZE(events));
    PyObject *cut_object = PyLong_FromUnsignedLongLong(cut);
    if (kept == NULL || cut_object == NULL) {
        Py_DECREF(values);
        Py_XDECREF(kept);
        Py_XDECREF(cut_object);
        return NULL;
    }
    return make_state(st, values, kept, cut_object);
}

/* Receiver._rationalize: every held state less what the oldest holds
 * (states[index] = states[index].subtract(oldest)). */
static int
rationalize_received(const State *st, PyObject *states)
{
    PyObject *oldest = Py_NewRef(PyList_GET_ITEM(states, 1));
    for (Py_ssize_t index = 1; index < PyList_GET_SIZE(states); index += 2) {
        /* held: subtract may run code that replaces states[index] */
        PyObject *item = Py_NewRef(PyList_GET_ITEM(states, index));
        PyObject *result = subtract(st, item, oldest);
        Py_DECREF(item);
        if (result == NULL) {
            Py_DECREF(oldest);
            return -1;
        }
        if (PyList_SetItem(states, index, result) < 0) {
            Py_DECREF(oldest);
            return -1;
        }
    }
    Py_DECREF(oldest);
    return 0;
}

/* Receiver.receive from "Nothing has changed so far" on: the states list
 * (throwaway states dropped, rationalized, maybe one evicted) gains the
 * new state, less what the oldest kept holds. Returns that state (new
 * reference) or NULL. */
PyObject *
change_receiver(const State *st, Work *w)
{
    PyObject *receiver = w->receiver;
    PyObject *kept;
    if (w->set_held)
        slot_set(receiver, st->rcv.held_events, w->held);
    if (w->keep_from) {
        /* self._states = states = states[keep_from:]; self._rationalize() */
        kept = PyList_GetSlice(w->states, w->keep_from,
                               PyList_GET_SIZE(w->states));
        if (kept == NULL)
            return NULL;
        slot_set(receiver, st->rcv.states, kept);
        if (rationalize_received(st, kept) < 0) {
            Py_DECREF(kept);
            return NULL;
        }
    }
    else
        kept = Py_NewRef(w->states);
    Py_ssize_t size = PyList_GET_SIZE(kept);
    if (size < 2 + 2 * w->evict) {
        Py_DECREF(kept);
        PyErr_SetString(PyExc_RuntimeError, "received states list shrank");
        return NULL;
    }
    /* new_state = new_state.subtract(states[_STATE]) */
    PyObject *oldest = Py_NewRef(PyList_GET_ITEM(kept, 1));
    PyObject *state = subtract(st, w->new_state, oldest);
    Py_DECREF(oldest);
    if (state == NULL) {
        Py_DECREF(kept);
        return NULL;
    }
    /* held = self._held_events; if held[0] is checked: (new_state, ...) */
    PyObject *held = SLOT(receiver, st->rcv.held_events);
    if (held != NULL && PyTuple_CheckExact(held) && PyTuple_GET_SIZE(held) == 3
            && PyTuple_GET_ITEM(held, 0) == w->new_state) {
        Py_INCREF(held);  /* its items are read after the allocation */
        PyObject *again = PyTuple_Pack(3, state, PyTuple_GET_ITEM(held, 1),
                                       PyTuple_GET_ITEM(held, 2));
        Py_DECREF(held);
        if (again == NULL)
            goto error;
        slot_set(receiver, st->rcv.held_events, again);
        Py_DECREF(again);
    }
    /* self._states = states[:2] + (states[4:] if evict else states[2:])
     *     + [new_num, new_state] */
    Py_ssize_t skip = w->evict ? 2 : 0;
    PyObject *states = PyList_New(size - skip + 2);
    if (states == NULL)
        goto error;
    if (PyList_GET_SIZE(kept) != size) {
        /* code run by subtract or the GC changed the list in place */
        Py_DECREF(states);
        PyErr_SetString(PyExc_RuntimeError, "received states list changed");
        goto error;
    }
    Py_ssize_t to = 0;
    for (Py_ssize_t from = 0; from < size; from++) {
        if (from >= 2 && from < 2 + skip)
            continue;
        PyList_SET_ITEM(states, to++, Py_NewRef(PyList_GET_ITEM(kept, from)));
    }
    PyList_SET_ITEM(states, to++, Py_NewRef(w->num));
    PyList_SET_ITEM(states, to, Py_NewRef(state));
    slot_set(receiver, st->rcv.states, states);
    Py_DECREF(states);
    Py_DECREF(kept);
    return state;
error:
    Py_DECREF(kept);
    Py_DECREF(state);
    return NULL;
}
