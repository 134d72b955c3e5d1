/*
 * broker/ssp/_speedups.c: the compiled receive path of SSPSession; this
 * file holds the entry point, _process and the module (the other parts:
 * _speedups.h).
 *
 * Why: a datagram through the Python receive path costs about 17 bare
 * decrypts, and the library calls alone (decrypt, zlib, protobuf, cbor2)
 * already cost about 4; the usual datagram must run in C to come near the
 * decrypt (issue #3).
 *
 * What: receive(session, data, address, now) is the usual case of
 * broker/ssp/incoming.py (receive_datagram, _receive, _accept, _process)
 * with DatagramLayer.decrypt/accept, RTTEstimator.add_sample_ms,
 * Sender.process_acknowledgment_through, _rationalize, set_data_ack and
 * calculate_timers, Receiver.receive and _rationalize, StateBounds.check,
 * DeviceState.apply and subtract, for one datagram that is: in order,
 * from the known address, one fragment, a small instruction (its ack may
 * move our front, but not to the shutdown state; its reference is any
 * state held), and a diff that sets or deletes values and appends events
 * (scalars, or arrays and maps of them, frozen as freeze() does), or none.
 * It returns
 *   None                     taken whole (the timers recalculated), or an
 *                            AUTH_FAILED rejection emitted as Python does;
 *   False                    handed over untouched (Python does it all);
 *   (nonce value, plaintext) handed over after the decrypt (Python goes on
 *                            with DatagramLayer.accept; never a second
 *                            decrypt).
 *
 * The rule: it ends in exactly the state the Python code would. So it works
 * in two phases: every check first, building the new objects but changing
 * nothing; then the changes, in the Python code's order, calling the
 * Python methods that cannot refuse where C does not do their rare cases
 * (DeviceState.subtract of another state type, Sender._rationalize of
 * many states, Sender.calculate_timers of odd times). Every "hand over"
 * names the Python line it mirrors. An exception in the check phase is
 * cleared and the datagram handed over: the Python code meets it again.
 *
 * It imports no broker module: broker/ssp/speedups.py gives it, once, the
 * classes (their __slots__ are read and written by offset, after an exact
 * type check), constants and functions it uses. Everything it keeps is in
 * the module state; the GIL is held throughout.
 */

#include "_speedups.h"

static State *
get_state(PyObject *module)
{
    return (State *)PyModule_GetState(module);
}

/* ---------------------------------------------------------------------
 * _process after Receiver.receive: the acknowledgement, decided here and
 * done in change().
 * ------------------------------------------------------------------ */

static int
check_process(const State *st, Work *w, PyObject *session, PyObject *now)
{
    /* answering = flags & SERVER and profile.answer_heartbeats */
    int answering = 0;
    if (w->flags & st->server) {
        PyObject *answer = SLOT(w->profile, st->p.answer_heartbeats);
        if (answer == NULL)
            return HAND_OVER;
        Py_INCREF(answer);  /* __bool__ may run Python code */
        answering = PyObject_IsTrue(answer);
        Py_DECREF(answer);
        if (answering < 0)
            return HAND_OVER;
    }
    /* wants_ack = answering or inst.diff */
    int wants_ack = answering || w->inst.diff_len > 0;
    /* _process appends to self._events: None or a list */
    PyObject *found = SLOT(session, st->s.events);
    if (found == NULL || (found != Py_None && !PyList_CheckExact(found)))
        return HAND_OVER;
    if (!(w->flags & st->hold_acks))
        w->acknowledge = 1;
    else if (w->unchanged) {
        /* state is UNCHANGED and sender.ack_num >= self._emitted_num */
        PyObject *ack = SLOT(w->sender, st->snd.ack_num);
        PyObject *emitted = SLOT(session, st->s.emitted_num);
        if (ack == NULL || emitted == NULL
                || (w->acknowledge = PyObject_RichCompareBool(
                        ack, emitted, Py_GE)) < 0)
            return HAND_OVER;
    }
    if (!wants_ack)
        return GO;
    if (w->acknowledge) {
        /* Sender.set_data_ack: due = now + ack_delay; the earlier one */
        PyObject *delay = SLOT(w->profile, st->p.ack_delay);
        PyObject *next = SLOT(w->sender, st->snd.next_ack_time);
        if (delay == NULL || next == NULL)
            return HAND_OVER;
        /* held: the addition may run Python code that replaces them */
        Py_INCREF(delay);
        Py_INCREF(next);
        PyObject *due = PyNumber_Add(now, delay);
        int earlier = due == NULL ? -1
            : PyObject_RichCompareBool(due, next, Py_LT);
        Py_DECREF(delay);
        Py_DECREF(next);
        if (due == NULL)
            return HAND_OVER;
        if (earlier > 0)
            w->ack_due = due;
        else
            Py_DECREF(due);
        return earlier < 0 ? HAND_OVER : GO;
    }
    /* held until durable: remember when it came (_ack_waiting) */
    PyObject *waiting = SLOT(session, st->s.ack_waiting);
    if (waiting == Py_None) {
        w->hold = 1;
        w->new_waiting = PyList_New(2);
        if (w->new_waiting == NULL)
            return HAND_OVER;
        PyList_SET_ITEM(w->new_waiting, 0, Py_NewRef(w->num));
        PyList_SET_ITEM(w->new_waiting, 1, Py_NewRef(now));
    }
    else if (waiting != NULL && PyList_CheckExact(waiting))
        w->hold = PyList_GET_SIZE(waiting) < st->max_acks_waiting * 2 ? 2 : 3;
    else
        return HAND_OVER;
    return GO;
}

/* ---------------------------------------------------------------------
 * The changes: everything was checked; now the Python code's assignments,
 * in its order. An error here (memory, or a Python method raising) is
 * raised, as it would be from the Python code.
 * ------------------------------------------------------------------ */

/* An event of a frozen, slotted dataclass, its slots filled directly as
 * events.py's _fast constructors do (skipping the frozen __init__). */
PyObject *
new_event(PyTypeObject *cls, Py_ssize_t first, PyObject *first_value,
          Py_ssize_t second, PyObject *second_value)
{
    PyObject *event = cls->tp_alloc(cls, 0);
    if (event == NULL)
        return NULL;
    slot_set(event, first, first_value);
    if (second_value != NULL)
        slot_set(event, second, second_value);
    return event;
}

/* receive_datagram: if not self._flags & CLOSED, recalculate the timers
 * (self._sender.calculate_timers(now, self._link.rtt)). */
static int
finish_timers(const State *st, PyObject *session, PyObject *now)
{
    PyObject *flags = get_slot(session, st->s.flags, "_flags");
    if (flags == NULL)
        return -1;
    long value = PyLong_CheckExact(flags) ? PyLong_AsLong(flags) : -1;
    if (value == -1) {
        /* not a small int: Python's own & */
        PyErr_Clear();
        PyObject *closed = PyLong_FromLong(st->closed);
        if (closed == NULL)
            return -1;
        PyObject *masked = PyNumber_And(flags, closed);
        Py_DECREF(closed);
        if (masked == NULL)
            return -1;
        int is_closed = PyObject_IsTrue(masked);
        Py_DECREF(masked);
        if (is_closed != 0)
            return is_closed < 0 ? -1 : 0;
    }
    else if (value & st->closed)
        return 0;
    PyObject *sender = get_slot(session, st->s.sender, "_sender");
    PyObject *link = get_slot(session, st->s.link, "_link");
    if (sender == NULL || link == NULL)
        return -1;
    PyObject *rtt = Py_TYPE(link) == st->link_type
        ? Py_XNewRef(get_slot(link, st->l.rtt, "rtt"))
        : PyObject_GetAttr(link, st->str_rtt);
    if (rtt == NULL)
        return -1;
    Py_INCREF(sender);
    int failed = calculate_timers(st, sender, now, rtt);
    Py_DECREF(sender);
    Py_DECREF(rtt);
    return failed;
}

/* SSPSession._emit(event) (it steals nothing; -1 on error). */
int
emit(const State *st, PyObject *session, PyObject *event)
{
    /* read afresh: the event's allocation may have run the GC */
    PyObject *found = get_slot(session, st->s.events, "_events");
    if (found == NULL)
        return -1;
    if (PyList_CheckExact(found))
        return PyList_Append(found, event);
    if (found != Py_None) {
        Py_INCREF(found);
        PyObject *done = PyObject_CallMethod(found, "append", "O", event);
        Py_DECREF(found);
        Py_XDECREF(done);
        return done == NULL ? -1 : 0;
    }
    PyObject *list = PyList_New(1);
    if (list == NULL)
        return -1;
    PyList_SET_ITEM(list, 0, Py_NewRef(event));
    slot_set(session, st->s.events, list);
    Py_DECREF(list);
    return 0;
}

/* The held ack (incoming.py, "held until durable"), decided again on the
 * slots as they are now: the allocations and Python calls since the
 * checks (the GC, __del__, an events list's append) may have replaced
 * them, and the Python code reads them here. 0, or -1 with an error. */
static int
hold_ack(const State *st, Work *w, PyObject *session, PyObject *now)
{
    PyObject *waiting = get_slot(session, st->s.ack_waiting,
                                 "_ack_waiting");
    if (waiting == NULL)
        return -1;
    if (waiting == Py_None) {
        /* self._ack_waiting = [num, now] */
        PyObject *list = w->new_waiting != NULL
            ? Py_NewRef(w->new_waiting) : PyList_New(2);
        if (list == NULL)
            return -1;
        if (w->new_waiting == NULL) {
            PyList_SET_ITEM(list, 0, Py_NewRef(w->num));
            PyList_SET_ITEM(list, 1, Py_NewRef(now));
        }
        slot_set(session, st->s.ack_waiting, list);
        Py_DECREF(list);
        return 0;
    }
    Py_INCREF(waiting);
    Py_ssize_t size = PyObject_Size(waiting);
    int failed = size < 0;
    if (!failed && size < st->max_acks_waiting * 2) {
        /* waiting += (num, now) */
        if (PyList_CheckExact(waiting))
            failed = PyList_Append(waiting, w->num) < 0
                || PyList_Append(waiting, now) < 0;
        else {
            PyObject *pair = PyTuple_Pack(2, w->num, now);
            PyObject *sum = pair ? PyNumber_InPlaceAdd(waiting, pair) : NULL;
            failed = sum == NULL;
            Py_XDECREF(pair);
            Py_XDECREF(sum);
        }
        Py_DECREF(waiting);
        return failed ? -1 : 0;
    }
    Py_DECREF(waiting);
    if (failed)
        return -1;
    /* self._flags |= ACKS_OVERFLOWED */
    PyObject *flags = get_slot(session, st->s.flags, "_flags");
    if (flags == NULL)
        return -1;
    PyObject *bit = PyLong_FromLong(st->acks_overflowed);
    PyObject *result = bit ? PyNumber_InPlaceOr(flags, bit) : NULL;
    Py_XDECREF(bit);
    if (result == NULL)
        return -1;
    slot_set(session, st->s.flags, result);
    Py_DECREF(result);
    return 0;
}

/* The changes of one datagram taken whole, then the timers. */
static int
change(const State *st, Work *w, PyObject *session, PyObject *now)
{
    PyObject *link = w->link, *sender = w->sender;
    /* DatagramLayer.accept */
    slot_set(link, st->l.expected_seq, w->next_expected);
    if (w->timestamp != NULL) {
        slot_set(link, st->l.saved_timestamp, w->timestamp);
        slot_set(link, st->l.saved_timestamp_at, w->now_ms);
    }
    if (w->rtt_sample) {
        slot_set(w->rtt, st->r.srtt_ms, w->srtt);
        slot_set(w->rtt, st->r.rttvar_ms, w->rttvar);
        slot_set(w->rtt, st->r.hit, Py_True);
    }
    slot_set(link, st->l.last_heard, now);
    /* _accept: one fragment ends any partial assembly */
    slot_set(session, st->s.assembly, Py_None);

    if (w->acked_from && change_sender(st, w, session) < 0)
        return -1;
    PyObject *state = change_receiver(st, w);
    if (state == NULL)
        return -1;

    /* _process */
    slot_set(sender, st->snd.last_heard, now);
    if (!w->unchanged) {
        /* state is not UNCHANGED: report it */
        slot_set(session, st->s.emitted_num, w->num);
        PyObject *event = new_event(st->received_type, st->e.received_state,
                                    state, st->e.received_num, w->num);
        if (event == NULL) {
            Py_DECREF(state);
            return -1;
        }
        int failed = emit(st, session, event);
        Py_DECREF(event);
        if (failed < 0) {
            Py_DECREF(state);
            return -1;
        }
    }
    Py_DECREF(state);
    if (w->acknowledge) {
        /* sender.ack_num = num; if wants_ack: sender.set_data_ack(now) */
        slot_set(sender, st->snd.ack_num, w->num);
        if (w->ack_due != NULL)
            slot_set(sender, st->snd.next_ack_time, w->ack_due);
    }
    else if (w->hold && hold_ack(st, w, session, now) < 0)
        return -1;
    return finish_timers(st, session, now);
}

static int
reject_auth_failed(const State *st, PyObject *session, PyObject *now)
{
    PyObject *event = PyObject_CallOneArg(st->datagram_rejected,
                                          st->auth_failed);
    if (event == NULL)
        return -1;
    PyObject *args[2] = {session, event};
    PyObject *done = PyObject_VectorcallMethod(st->str_emit, args, 2, NULL);
    Py_DECREF(event);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return finish_timers(st, session, now);
}

static void
work_clear(Work *w)
{
    Py_CLEAR(w->link);
    Py_CLEAR(w->rtt);
    Py_CLEAR(w->sender);
    Py_CLEAR(w->receiver);
    Py_CLEAR(w->profile);
    Py_CLEAR(w->bounds);
    Py_CLEAR(w->states);
    Py_CLEAR(w->reference);
    Py_CLEAR(w->plaintext);
    Py_CLEAR(w->raw);
    Py_CLEAR(w->next_expected);
    Py_CLEAR(w->timestamp);
    Py_CLEAR(w->now_ms);
    Py_CLEAR(w->srtt);
    Py_CLEAR(w->rttvar);
    Py_CLEAR(w->num);
    Py_CLEAR(w->new_state);
    Py_CLEAR(w->held);
    Py_CLEAR(w->ack_due);
    Py_CLEAR(w->new_waiting);
}


/* ---------------------------------------------------------------------
 * The entry point.
 * ------------------------------------------------------------------ */

static PyObject *
take(State *st, Work *w, PyObject *session, PyObject *data,
     PyObject *address, PyObject *now)
{
    Py_ssize_t offset = 0;
    if (st->session_type == NULL && bind_session_type(st) < 0)
        return NULL;
    int verdict = check_framing(st, w, session, data, now, &offset);
    if (verdict < 0)
        return NULL;
    if (verdict == HAND_OVER) {
        PyErr_Clear();
        st->handed_over++;
        Py_RETURN_FALSE;
    }
    verdict = decrypt(st, w, session, data, offset);
    if (verdict < 0)
        return NULL;
    if (verdict == 1) {
        if (reject_auth_failed(st, session, now) < 0)
            return NULL;
        st->taken++;
        Py_RETURN_NONE;
    }
    if (!PyBytes_CheckExact(w->plaintext)
            || check_accept(st, w, address) != GO
            || check_instruction(st, w) != GO
            || check_ack(st, w) != GO
            || check_receive(st, w) != GO
            || check_process(st, w, session, now) != GO) {
        /* decrypted: Python goes on from DatagramLayer.accept */
        PyErr_Clear();
        st->handed_over++;
        PyObject *nonce = PyLong_FromUnsignedLongLong(w->nonce_value);
        if (nonce == NULL)
            return NULL;
        PyObject *opened = PyTuple_Pack(2, nonce, w->plaintext);
        Py_DECREF(nonce);
        return opened;
    }
    if (change(st, w, session, now) < 0)
        return NULL;
    st->taken++;
    Py_RETURN_NONE;
}

/* The module state for an entry point called with ``given`` arguments, or
 * NULL with a TypeError (not ``wanted``) or a RuntimeError (no setup yet). */
static State *
entry_state(PyObject *module, const char *name, Py_ssize_t wanted,
            Py_ssize_t given)
{
    State *st = get_state(module);
    if (given != wanted) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)",
                     name, wanted, given);
        return NULL;
    }
    if (!st->ready) {
        PyErr_SetString(PyExc_RuntimeError, "call setup() first");
        return NULL;
    }
    return st;
}

PyDoc_STRVAR(receive_doc,
"receive(session, data, address, now) -> None, False or (nonce, plaintext)\n\n"
"SSPSession.receive_datagram's usual case (see broker/ssp/speedups.py):\n"
"None when taken whole, False to hand over untouched, (nonce value,\n"
"plaintext) to hand over after the decrypt.");

static PyObject *
receive(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "receive", 4, nargs);
    if (st == NULL)
        return NULL;
    Work w;
    memset(&w, 0, offsetof(Work, inflated));
    PyObject *result = take(st, &w, args[0], args[1], args[2], args[3]);
    work_clear(&w);
    return result;
}

PyDoc_STRVAR(timers_doc,
"timers(sender, now, rtt) -> bool\n\n"
"sender.calculate_timers(now, rtt) as the receive path does it (for the\n"
"tests): True when C computed it, False when it called the method.");

static PyObject *
timers(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "timers", 3, nargs);
    if (st == NULL)
        return NULL;
    int in_c = Py_TYPE(args[0]) == st->sender_type
        && fast_timers(st, args[0], args[1], args[2]) == GO;
    if (!in_c && calculate_timers(st, args[0], args[1], args[2]) < 0)
        return NULL;
    return PyBool_FromLong(in_c);
}

PyDoc_STRVAR(set_state_doc,
"set_state(sender, state, now) -> None\n\n"
"sender.set_current_state(state, now), its state comparisons in C.");

static PyObject *
set_state_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "set_state", 3, nargs);
    if (st == NULL)
        return NULL;
    return set_state(st, args[0], args[1], args[2]);
}

PyDoc_STRVAR(counts_doc,
"counts() -> (taken, handed_over): datagrams since import.");

static PyObject *
counts(PyObject *module, PyObject *unused)
{
    State *st = get_state(module);
    return Py_BuildValue("(KK)", st->taken, st->handed_over);
}

PyDoc_STRVAR(send_doc,
"send(session, now) -> list or None\n\n"
"SSPSession.datagrams_to_send's usual empty ack or new state (see\n"
"_speedups_send.c):\n"
"the list of (datagram, address) pairs when taken whole, None to hand\n"
"over untouched (Python does it all).");

static PyObject *
send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "send", 2, nargs);
    if (st == NULL)
        return NULL;
    return send_fast(st, args[0], args[1]);
}

PyDoc_STRVAR(deflate_doc,
"deflate(raw) -> bytes or None\n\n"
"zlib.compress(raw)'s bytes for an instruction of at most\n"
"SMALL_INSTRUCTION bytes: deflate_tiny's where it can say, else from one\n"
"zlib stream kept for the module; None where it cannot say (no zlib\n"
"linked, an input longer than setup()'s small_instruction).");

/* 0 if raw is bytes, else -1 with a TypeError naming the function. */
static int
check_bytes(PyObject *raw, const char *name)
{
    if (PyBytes_CheckExact(raw))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes bytes, not %.100s", name,
                 Py_TYPE(raw)->tp_name);
    return -1;
}

/* result; or None where the callee could not say (NULL, no exception). */
static PyObject *
or_none(PyObject *result)
{
    if (result != NULL || PyErr_Occurred())
        return result;
    Py_RETURN_NONE;
}

static PyObject *
deflate_entry(PyObject *module, PyObject *raw)
{
    if (check_bytes(raw, "deflate") < 0)
        return NULL;
    return or_none(deflate_short(get_state(module),
                                 (const unsigned char *)PyBytes_AS_STRING(raw),
                                 PyBytes_GET_SIZE(raw)));
}

PyDoc_STRVAR(deflate_tiny_doc,
"deflate_tiny(raw) -> bytes or None\n\n"
"zlib.compress(raw)'s bytes computed without zlib (_speedups_deflate.c),\n"
"or None where zlib's choice of block cannot be known so (or raw is longer\n"
"than 96 bytes). For the tests: deflate() calls it first.");

static PyObject *
deflate_tiny_entry(PyObject *module, PyObject *raw)
{
    if (check_bytes(raw, "deflate_tiny") < 0)
        return NULL;
    return or_none(deflate_tiny((const unsigned char *)PyBytes_AS_STRING(raw),
                                PyBytes_GET_SIZE(raw)));
}

PyDoc_STRVAR(diff_doc,
"diff(current, base) -> bytes or None\n\n"
"current.diff_from(base) written in C (_speedups_values.c) for a diff of\n"
"values only, or None where the method must say. For the tests: the send\n"
"path calls it first.");

static PyObject *
diff_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "diff", 2, nargs);
    if (st == NULL)
        return NULL;
    return or_none(diff_values(st, args[0], args[1]));
}

PyDoc_STRVAR(with_numbers_doc,
"with_numbers(state, patch) -> DeviceState or None\n\n"
"DeviceState.with_numbers(patch) in C (_speedups_values.c); None also\n"
"where C cannot say (a subclass, a patch that is not a dict).");

static PyObject *
with_numbers_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "with_numbers", 2, nargs);
    if (st == NULL)
        return NULL;
    return or_none(with_numbers(st, args[0], args[1]));
}

PyDoc_STRVAR(values_patch_doc,
"values_patch(old, new) -> dict or None\n\n"
"broker.udp.convert.reported_patch(old, new) in C for scalar values\n"
"(_speedups_values.c), or None where the Python code must make it.");

static PyObject *
values_patch_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = entry_state(module, "values_patch", 2, nargs);
    if (st == NULL)
        return NULL;
    return or_none(values_patch(st, args[0], args[1]));
}

PyDoc_STRVAR(state_record_doc,
"state_record(state) -> bytes or None\n\n"
"broker.udp.convert.encode_state(state) in C for a state holding no\n"
"events and scalar values (_speedups_values.c), else None.");

static PyObject *
state_record_entry(PyObject *module, PyObject *state)
{
    State *st = entry_state(module, "state_record", 1, 1);
    if (st == NULL)
        return NULL;
    return or_none(state_record(st, state));
}

PyDoc_STRVAR(next_wakeup_doc,
"next_wakeup(session) -> float, None or NotImplemented\n\n"
"SSPSession.next_wakeup() in C (_speedups_sender.c), or NotImplemented\n"
"where the Python code must say.");

static PyObject *
next_wakeup_entry(PyObject *module, PyObject *session)
{
    State *st = entry_state(module, "next_wakeup", 1, 1);
    if (st == NULL)
        return NULL;
    return session_wakeup(st, session);
}

PyDoc_STRVAR(send_counts_doc,
"send_counts() -> (taken, handed_over): datagrams_to_send calls since\n"
"import.");

static PyObject *
send_counts(PyObject *module, PyObject *unused)
{
    State *st = get_state(module);
    return Py_BuildValue("(KK)", st->sends_taken, st->sends_handed_over);
}

PyDoc_STRVAR(setup_doc,
"setup(**objects): the classes, constants and functions receive() uses\n"
"(broker/ssp/speedups.py gives them).");

static PyObject *
setup(PyObject *module, PyObject *args, PyObject *kwargs)
{
    return setup_state(get_state(module), args, kwargs);
}

/* ---------------------------------------------------------------------
 * The module (its state holds every reference; no other global state).
 * ------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"receive", (PyCFunction)(void (*)(void))receive, METH_FASTCALL,
     receive_doc},
    {"counts", counts, METH_NOARGS, counts_doc},
    {"send", (PyCFunction)(void (*)(void))send, METH_FASTCALL, send_doc},
    {"send_counts", send_counts, METH_NOARGS, send_counts_doc},
    {"deflate", deflate_entry, METH_O, deflate_doc},
    {"deflate_tiny", deflate_tiny_entry, METH_O, deflate_tiny_doc},
    {"timers", (PyCFunction)(void (*)(void))timers, METH_FASTCALL,
     timers_doc},
    {"set_state", (PyCFunction)(void (*)(void))set_state_entry, METH_FASTCALL,
     set_state_doc},
    {"diff", (PyCFunction)(void (*)(void))diff_entry, METH_FASTCALL,
     diff_doc},
    {"with_numbers", (PyCFunction)(void (*)(void))with_numbers_entry,
     METH_FASTCALL, with_numbers_doc},
    {"values_patch", (PyCFunction)(void (*)(void))values_patch_entry,
     METH_FASTCALL, values_patch_doc},
    {"state_record", state_record_entry, METH_O, state_record_doc},
    {"next_wakeup", next_wakeup_entry, METH_O, next_wakeup_doc},
    {"setup", (PyCFunction)(void (*)(void))setup,
     METH_VARARGS | METH_KEYWORDS, setup_doc},
    {NULL, NULL, 0, NULL},
};

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = get_state(module);
    if (st == NULL)
        return 0;
    Py_VISIT(st->session_class_getter);
    Py_VISIT(st->session_type);
    Py_VISIT(st->link_type);
    Py_VISIT(st->rtt_type);
    Py_VISIT(st->sender_type);
    Py_VISIT(st->receiver_type);
    Py_VISIT(st->state_type);
    Py_VISIT(st->profile_type);
    Py_VISIT(st->bounds_type);
    Py_VISIT(st->received_type);
    Py_VISIT(st->acknowledged_type);
    Py_VISIT(st->cipher_cache_type);
    Py_VISIT(st->ordered_dict_type);
    Py_VISIT(st->buffered_random_type);
    Py_VISIT(st->invalid_tag);
    Py_VISIT(st->decompress);
    Py_VISIT(st->datagram_rejected);
    Py_VISIT(st->auth_failed);
    Py_VISIT(st->no_values);
    Py_VISIT(st->empty_map);
    Py_VISIT(st->never);
    Py_VISIT(st->make_chaff);
    Py_VISIT(st->deflate);
    Py_VISIT(st->instruction_class);
    return 0;
}

static void
clear_names(State *st)
{
    Py_CLEAR(st->str_get);
    Py_CLEAR(st->str_decrypt);
    Py_CLEAR(st->str_emit);
    Py_CLEAR(st->str_rationalize);
    Py_CLEAR(st->str_subtract);
    Py_CLEAR(st->str_calculate_timers);
    Py_CLEAR(st->str_rtt);
    Py_CLEAR(st->str_front_num);
    Py_CLEAR(st->str_move_to_end);
    Py_CLEAR(st->str_encrypt);
    Py_CLEAR(st->str_send_instruction);
    Py_CLEAR(st->str_join);
    Py_CLEAR(st->str_encode);
    Py_CLEAR(st->str_diff_from);
    Py_CLEAR(st->str_set_current_state);
}

static int
module_clear(PyObject *module)
{
    State *st = get_state(module);
    if (st == NULL)
        return 0;
    state_clear_objects(st);
    clear_names(st);
    send_free(st);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "broker.ssp._speedups",
    .m_doc = "The compiled receive path of SSPSession (see speedups.py).",
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

#define INTERN(field, text) \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL) goto error

#ifdef SP_HAVE_ZLIB
#define ZLIB_LINKED Py_True
#else
#define ZLIB_LINKED Py_False
#endif

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    State *st = get_state(module);
    memset(st, 0, sizeof(*st));
    INTERN(str_get, "get");
    INTERN(str_decrypt, "decrypt");
    INTERN(str_emit, "_emit");
    INTERN(str_rationalize, "_rationalize");
    INTERN(str_subtract, "subtract");
    INTERN(str_calculate_timers, "calculate_timers");
    INTERN(str_rtt, "rtt");
    INTERN(str_front_num, "front_num");
    INTERN(str_move_to_end, "move_to_end");
    INTERN(str_encrypt, "encrypt");
    INTERN(str_send_instruction, "_send_instruction");
    INTERN(str_join, "join");
    INTERN(str_encode, "encode");
    INTERN(str_diff_from, "diff_from");
    INTERN(str_set_current_state, "set_current_state");
    if (PyType_Ready(&DeadlineQueueType) < 0
            || PyModule_AddObjectRef(module, "DeadlineQueue",
                                     (PyObject *)&DeadlineQueueType) < 0)
        goto error;
    /* OCBCipher where setup.py linked OpenSSL (HAVE_OPENSSL says whether
     * it is there); HAVE_ZLIB whether zlib was linked (inflate_small): so
     * that CI can tell a silently left-out library from a built one */
    if (add_ocb_cipher(module) < 0
            || PyModule_AddObjectRef(module, "HAVE_ZLIB", ZLIB_LINKED) < 0)
        goto error;
    return module;
error:
    Py_DECREF(module);
    return NULL;
}
