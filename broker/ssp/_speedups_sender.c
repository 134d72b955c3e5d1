/*
 * broker/ssp/_speedups_sender.c: the sending half, as a receive touches
 * it (broker/ssp/sender.py Sender.process_acknowledgment_through,
 * _rationalize, calculate_timers, retransmit_timeout, send_interval,
 * _assumed_index; broker/ssp/datagram.py RTTEstimator.rto and srtt).
 *
 * The timers are computed in doubles where that is exactly what Python
 * computes: the times are floats or ints of at most 2**52 (their sums
 * and differences are then exact as Python's are), the profile's
 * constants floats, the RTT's milliseconds floats or small ints. Anything
 * else calls the Python method, which the receive path may always do:
 * calculate_timers cannot refuse, it only sets the two deadlines.
 */

#include "_speedups.h"

/* The most states Sender._rationalize is done for in C (its id -> result
 * memo is an array here); more calls the Python method. */
#define RATIONALIZE_MAX 64

/* Sender.process_acknowledgment_through(inst.ack_num), checked: sets
 * w->acked_from when the front moves (to a kept state acknowledged). */
int
check_ack(const State *st, Work *w)
{
    uint64_t front, num;
    PyObject *sent = SLOT(w->sender, st->snd.sent);
    if (sent == NULL || !PyList_CheckExact(sent)
            || PyList_GET_SIZE(sent) < SENT_STRIDE
            || as_u64(PyList_GET_ITEM(sent, 1), &front) < 0)
        return HAND_OVER;
    /* if ack_num == sent[_NUM]: return False (the usual case) */
    if (w->inst.ack_num == front)
        return GO;
    /* for index in range(_STRIDE + _NUM, len(sent), _STRIDE) */
    for (Py_ssize_t index = SENT_STRIDE + 1; index < PyList_GET_SIZE(sent);
         index += SENT_STRIDE) {
        if (as_u64(PyList_GET_ITEM(sent, index), &num) < 0)
            return HAND_OVER;
        if (num == w->inst.ack_num) {
            w->acked_from = index - 1;
            break;
        }
    }
    /* _process: sender.shutdown_acknowledged closes the session */
    if (w->acked_from && w->inst.ack_num == UINT64_MAX_VALUE)
        return HAND_OVER;
    return GO;
}

/* _rationalize's memo (done.get(id(state))): the result kept for
 * ``state`` (a new reference), or NULL when it has none yet. */
static PyObject *
memo_find(PyObject *const *originals, PyObject *const *results,
          Py_ssize_t count, PyObject *state)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        if (originals[i] == state)
            return Py_NewRef(results[i]);
    }
    return NULL;
}

/* Sender._rationalize: every kept state less what the acknowledged one
 * holds, equal states kept one object (done: id -> subtracted), and the
 * new front swapped in for an equal current state. */
static int
rationalize_sent(const State *st, PyObject *sender)
{
    PyObject *sent = SLOT(sender, st->snd.sent);
    PyObject *current = SLOT(sender, st->snd.current);
    Py_ssize_t size;
    if (sent == NULL || !PyList_CheckExact(sent) || current == NULL
            || (size = PyList_GET_SIZE(sent)) < SENT_STRIDE
            || size % SENT_STRIDE
            || size / SENT_STRIDE > RATIONALIZE_MAX) {
        PyObject *done = PyObject_CallMethodNoArgs(sender,
                                                   st->str_rationalize);
        Py_XDECREF(done);
        return done == NULL ? -1 : 0;
    }
    /* held, and every slot read afresh: subtract() allocates and may run
     * Python code (the GC, __del__, a subclass), which may replace the
     * sender's slots or change the list as the Python code would see */
    Py_INCREF(sent);
    PyObject *front = Py_NewRef(PyList_GET_ITEM(sent, 2));
    PyObject *result;
    int status = -1;
    if (size == SENT_STRIDE) {
        /* Everything sent is acknowledged (the usual case):
         * result = sent[_STATE] = front.subtract(front); self.current =
         * result if current is front else current.subtract(front) */
        if ((result = subtract(st, front, front)) == NULL)
            goto error;
        if (PyList_SetItem(sent, 2, Py_NewRef(result)) < 0
                || (current = get_slot(sender, st->snd.current,
                                       "current")) == NULL) {
            Py_DECREF(result);
            goto error;
        }
        if (current != front) {
            Py_DECREF(result);
            Py_INCREF(current);
            result = subtract(st, current, front);
            Py_DECREF(current);
            if (result == NULL)
                goto error;
        }
        slot_set(sender, st->snd.current, result);
        Py_DECREF(result);
        status = 0;
        goto error;
    }
    /* for index in range(_STATE, len(sent), _STRIDE): the memo holds the
     * original states (alive: no id is reused meanwhile) */
    PyObject *originals[RATIONALIZE_MAX], *results[RATIONALIZE_MAX];
    Py_ssize_t count = 0;
    for (Py_ssize_t index = 2; index < PyList_GET_SIZE(sent);
         index += SENT_STRIDE) {
        PyObject *state = PyList_GetItem(sent, index);
        if (state == NULL)
            goto memo_error;
        result = memo_find(originals, results, count, state);
        if (result == NULL) {
            if (count >= RATIONALIZE_MAX) {
                /* the list grew meanwhile: Python's _rationalize */
                PyErr_SetString(PyExc_RuntimeError,
                                "sent states changed while rationalized");
                goto memo_error;
            }
            Py_INCREF(state);
            result = subtract(st, state, front);
            if (result == NULL) {
                Py_DECREF(state);
                goto memo_error;
            }
            originals[count] = state;
            results[count++] = Py_NewRef(result);
        }
        if (PyList_SetItem(sent, index, result) < 0)  /* steals result */
            goto memo_error;
    }
    /* current = self.current = done.get(id(current)) or
     * current.subtract(front) */
    current = get_slot(sender, st->snd.current, "current");
    if (current == NULL)
        goto memo_error;
    result = memo_find(originals, results, count, current);
    if (result == NULL) {
        Py_INCREF(current);
        result = subtract(st, current, front);
        Py_DECREF(current);
        if (result == NULL)
            goto memo_error;
    }
    slot_set(sender, st->snd.current, result);
    Py_DECREF(result);
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(originals[i]);
        Py_DECREF(results[i]);
    }
    Py_DECREF(front);
    /* front = sent[_STATE]; if current is not front and current == front:
     * if sent[-1] is current: sent[-1] = front; self.current = front */
    current = get_slot(sender, st->snd.current, "current");
    front = PyList_GetItem(sent, 2);
    if (current == NULL || front == NULL) {
        Py_DECREF(sent);
        return -1;
    }
    Py_INCREF(current);
    Py_INCREF(front);
    int equal = current == front ? 0 : states_equal(st, current, front);
    if (equal > 0) {
        Py_ssize_t last = PyList_GET_SIZE(sent) - 1;
        if (last >= 0 && PyList_GET_ITEM(sent, last) == current)
            PyList_SetItem(sent, last, Py_NewRef(front));
        slot_set(sender, st->snd.current, front);
    }
    Py_DECREF(current);
    Py_DECREF(front);
    Py_DECREF(sent);
    return equal < 0 ? -1 : 0;
memo_error:
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(originals[i]);
        Py_DECREF(results[i]);
    }
error:
    Py_DECREF(front);
    Py_DECREF(sent);
    return status;
}

/* Sender.process_acknowledgment_through, the front moved: drop the
 * states before it (self._sent = sent[index - _NUM:]), self._backoff = 0,
 * self._rationalize(); then _process's StateAcknowledged(front_num). */
int
change_sender(const State *st, Work *w, PyObject *session)
{
    PyObject *sender = w->sender;
    PyObject *sent = SLOT(sender, st->snd.sent);
    PyObject *kept = PyList_GetSlice(sent, w->acked_from,
                                     PyList_GET_SIZE(sent));
    PyObject *zero = PyLong_FromLong(0);
    if (kept == NULL || zero == NULL) {
        Py_XDECREF(kept);
        Py_XDECREF(zero);
        return -1;
    }
    slot_set(sender, st->snd.sent, kept);
    slot_set(sender, st->snd.backoff, zero);
    Py_DECREF(zero);
    Py_DECREF(kept);
    if (rationalize_sent(st, sender) < 0)
        return -1;
    /* self._emit(_state_acknowledged(sender.front_num)) */
    sent = SLOT(sender, st->snd.sent);
    PyObject *front = sent != NULL && PyList_CheckExact(sent)
        && PyList_GET_SIZE(sent) > 1
        ? Py_NewRef(PyList_GET_ITEM(sent, 1))
        : PyObject_GetAttr(sender, st->str_front_num);
    if (front == NULL)
        return -1;
    PyObject *event = new_event(st->acknowledged_type, st->e.acknowledged_num,
                                front, 0, NULL);
    Py_DECREF(front);
    if (event == NULL)
        return -1;
    int failed = emit(st, session, event);
    Py_DECREF(event);
    return failed;
}

/* ---------------------------------------------------------------------
 * The timers.
 * ------------------------------------------------------------------ */

/* A time slot as a double (see the top of the file). */
int
time_of(PyObject *obj, double *out)
{
    if (obj != NULL && PyFloat_CheckExact(obj)) {
        *out = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    if (as_double(obj, out) < 0 || !(fabs(*out) <= 4503599627370496.0))
        return -1;  /* not a number, or an int past 2**52 */
    return 0;
}

/* x / 1000 where x = math.ceil(value): Python's int true division of the
 * exact integer, which IEEE division of that integer (a double) rounds
 * alike. -1 when ceil() would raise (inf, NaN). */
static int
ceil_ms(double value, double *out)
{
    if (!isfinite(value))
        return -1;
    *out = ceil(value) / 1000.0;
    return 0;
}

/* The profile's timings as doubles (Timing: _speedups.h); -1 when one is
 * not an exact float (the caller lets Python compute). */
int
timing_of(const State *st, PyObject *profile, Timing *t)
{
    if (profile == NULL || Py_TYPE(profile) != st->profile_type)
        return -1;
    PyObject *backoff = SLOT(profile, st->p.retransmit_backoff);
    if (backoff != Py_True && backoff != Py_False)
        return -1;
    t->retransmit_backoff = backoff == Py_True;
    if (as_float(SLOT(profile, st->p.send_interval_min),
                 &t->send_interval_min) < 0
            || as_float(SLOT(profile, st->p.send_interval_max),
                        &t->send_interval_max) < 0
            || as_float(SLOT(profile, st->p.send_mindelay),
                        &t->send_mindelay) < 0
            || as_float(SLOT(profile, st->p.active_retry_timeout),
                        &t->active_retry_timeout) < 0
            || as_float(SLOT(profile, st->p.ack_delay), &t->ack_delay) < 0
            || as_float(SLOT(profile, st->p.backoff_max),
                        &t->backoff_max) < 0)
        return -1;
    return 0;
}

/* Sender.send_interval(rtt.srtt) */
int
send_interval(const State *st, const Timing *t, PyObject *rtt, double *out)
{
    double srtt_ms, interval;
    /* srtt = self._srtt_ms / 1000; ceil(srtt * 500) / 1000 */
    if (ms_of(SLOT(rtt, st->r.srtt_ms), &srtt_ms) < 0
            || ceil_ms((srtt_ms / 1000.0) * 500.0, &interval) < 0)
        return -1;
    if (interval < t->send_interval_min)
        *out = t->send_interval_min;
    else if (interval > t->send_interval_max)
        *out = t->send_interval_max;
    else
        *out = interval;
    return 0;
}

/* Sender.retransmit_timeout(rtt): rtt.rto, doubled per backoff step. */
int
retransmit_timeout(const State *st, const Timing *t, PyObject *sender,
                   PyObject *rtt, double *out)
{
    double srtt_ms, rttvar_ms, rto;
    long backoff;
    /* rto = math.ceil(self._srtt_ms + 4 * self._rttvar_ms) / 1000, then
     * clamped to [_MIN_RTO, _MAX_RTO] */
    if (ms_of(SLOT(rtt, st->r.srtt_ms), &srtt_ms) < 0
            || ms_of(SLOT(rtt, st->r.rttvar_ms), &rttvar_ms) < 0
            || ceil_ms(srtt_ms + 4 * rttvar_ms, &rto) < 0)
        return -1;
    if (rto < st->min_rto)
        rto = st->min_rto;
    else if (rto > st->max_rto)
        rto = st->max_rto;
    PyObject *steps = SLOT(sender, st->snd.backoff);
    if (steps == NULL || !PyLong_CheckExact(steps)
            || (backoff = PyLong_AsLong(steps)) < 0 || backoff > 52) {
        PyErr_Clear();
        return -1;
    }
    *out = rto;
    if (backoff) {
        /* grown = rto * (1 << backoff); grown if grown < ceiling, else
         * rto if rto > ceiling else ceiling */
        double grown = rto * (double)((int64_t)1 << backoff);
        if (grown < t->backoff_max)
            *out = grown;
        else if (!(rto > t->backoff_max))
            *out = t->backoff_max;
    }
    return 0;
}

/* Sender._assumed_index(now, rto): the index of the state the peer
 * probably has (a multiple of 3). -1: a time Python must read. (Also
 * Sender.tick's, in the send path.) */
Py_ssize_t
assumed_index(const Timing *t, PyObject *sent, double now, double rto)
{
    double limit = rto + t->ack_delay, time;
    Py_ssize_t assumed = 0, size = PyList_GET_SIZE(sent);
    for (Py_ssize_t index = SENT_STRIDE; index < size; index += SENT_STRIDE) {
        if (time_of(PyList_GET_ITEM(sent, index), &time) < 0)
            return -1;
        /* backoff: now < sent[index] + limit; else now - sent[index] <
         * limit (mosh's form) */
        if (t->retransmit_backoff ? now < time + limit : now - time < limit)
            assumed = index;
        else if (index + 2 >= size
                 || PyList_GET_ITEM(sent, index + 2)
                    != PyList_GET_ITEM(sent, index - 1))
            break;
    }
    return assumed;
}

/* Sender.calculate_timers(now, rtt) in C: GO, or HAND_OVER before any
 * change (Python then computes). */
int
fast_timers(const State *st, PyObject *sender, PyObject *now_object,
            PyObject *rtt)
{
    Timing t;
    double now, back_time, next_send = 0, next_ack = 0, interval, clock, rto;
    int set_clock = 0, never = 0, shutdown;
    PyObject *sent = SLOT(sender, st->snd.sent);
    PyObject *current = SLOT(sender, st->snd.current);
    PyObject *mindelay_clock = SLOT(sender, st->snd.mindelay_clock);
    PyObject *shutdown_slot = SLOT(sender, st->snd.shutdown);
    PyObject *ack_num = SLOT(sender, st->snd.ack_num);
    Py_ssize_t size;
    if (timing_of(st, SLOT(sender, st->snd.profile), &t) < 0
            || rtt == NULL || Py_TYPE(rtt) != st->rtt_type || sent == NULL
            || !PyList_CheckExact(sent)
            || (size = PyList_GET_SIZE(sent)) < SENT_STRIDE
            || size % SENT_STRIDE
            || current == NULL || mindelay_clock == NULL
            || shutdown_slot == NULL || ack_num == NULL
            || !PyLong_CheckExact(ack_num)
            || time_of(now_object, &now) < 0
            || time_of(PyList_GET_ITEM(sent, size - 3), &back_time) < 0)
        return HAND_OVER;
    if (current != PyList_GET_ITEM(sent, size - 1)) {
        /* if self._mindelay_clock is None: self._mindelay_clock = now;
         * max(clock + send_mindelay, back_time + send_interval) */
        if (mindelay_clock == Py_None) {
            set_clock = 1;
            clock = now;
        }
        else if (time_of(mindelay_clock, &clock) < 0)
            return HAND_OVER;
        if (send_interval(st, &t, rtt, &interval) < 0)
            return HAND_OVER;
        double first = clock + t.send_mindelay;
        double second = back_time + interval;
        next_send = second > first ? second : first;
    }
    else if (current == PyList_GET_ITEM(sent, 2))
        never = 1;  /* everything acknowledged */
    else {
        double last_heard;
        if (time_of(SLOT(sender, st->snd.last_heard), &last_heard) < 0)
            return HAND_OVER;
        /* not self.last_heard + active_retry_timeout > now: silent peer */
        if (!(last_heard + t.active_retry_timeout > now))
            never = 1;
        else {
            if (retransmit_timeout(st, &t, sender, rtt, &rto) < 0)
                return HAND_OVER;
            Py_ssize_t assumed = assumed_index(&t, sent, now, rto);
            if (assumed < 0)
                return HAND_OVER;
            if (current != PyList_GET_ITEM(sent, assumed + 2)) {
                if (send_interval(st, &t, rtt, &interval) < 0)
                    return HAND_OVER;
                next_send = back_time + interval;
                if (t.retransmit_backoff) {
                    double backed = back_time + (rto + t.ack_delay);
                    if (backed > next_send)
                        next_send = backed;
                }
                if (mindelay_clock != Py_None) {
                    if (time_of(mindelay_clock, &clock) < 0)
                        return HAND_OVER;
                    double delayed = clock + t.send_mindelay;
                    if (delayed > next_send)
                        next_send = delayed;
                }
            }
            else if (t.retransmit_backoff)
                next_send = back_time + (rto + t.ack_delay);
            else
                next_send = back_time + rto + t.ack_delay;
        }
    }
    /* if self._shutdown is not None or self.ack_num == UINT64_MAX: the
     * ack is due a send interval after the last send */
    uint64_t ack;
    shutdown = shutdown_slot != Py_None
        || (as_u64(ack_num, &ack) == 0 && ack == UINT64_MAX_VALUE);
    if (shutdown) {
        if (send_interval(st, &t, rtt, &interval) < 0)
            return HAND_OVER;
        next_ack = back_time + interval;
    }
    /* the changes */
    PyObject *send_object = never ? Py_NewRef(st->never)
        : PyFloat_FromDouble(next_send);
    PyObject *ack_object = shutdown ? PyFloat_FromDouble(next_ack) : NULL;
    if (send_object == NULL || (shutdown && ack_object == NULL)) {
        Py_XDECREF(send_object);
        Py_XDECREF(ack_object);
        return HAND_OVER;
    }
    if (set_clock)
        slot_set(sender, st->snd.mindelay_clock, now_object);
    slot_set(sender, st->snd.next_send_time, send_object);
    Py_DECREF(send_object);
    if (shutdown) {
        slot_set(sender, st->snd.next_ack_time, ack_object);
        Py_DECREF(ack_object);
    }
    return GO;
}

/* sender.calculate_timers(now, rtt): in C when fast_timers can, else the
 * Python method. 0, or -1 with the method's exception. */
int
calculate_timers(const State *st, PyObject *sender, PyObject *now,
                 PyObject *rtt)
{
    if (Py_TYPE(sender) == st->sender_type
            && fast_timers(st, sender, now, rtt) == GO)
        return 0;
    PyErr_Clear();
    PyObject *args[3] = {sender, now, rtt};
    PyObject *result = PyObject_VectorcallMethod(
        st->str_calculate_timers, args, 3, NULL);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* state == other as DeviceState.__eq__ answers it: 1, 0, or -1 with an
 * exception. The method's first test, in C: two exact DeviceStates whose
 * values (Python's ==), event base or events differ are unequal (a new
 * report's state, against the states the sender keeps). Anything else
 * (equal-looking values: the method then compares them as the wire does;
 * another type) calls ==. */
int
states_equal(const State *st, PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    if (Py_TYPE(a) == st->state_type && Py_TYPE(b) == st->state_type) {
        PyObject *values_a = SLOT(a, st->ds.values);
        PyObject *values_b = SLOT(b, st->ds.values);
        PyObject *events_a = SLOT(a, st->ds.events);
        PyObject *events_b = SLOT(b, st->ds.events);
        PyObject *base_a = SLOT(a, st->ds.event_base);
        PyObject *base_b = SLOT(b, st->ds.event_base);
        if (values_a != NULL && values_b != NULL && base_a != NULL
                && base_b != NULL && events_a != NULL && events_b != NULL
                && PyTuple_CheckExact(events_a) && PyTuple_CheckExact(events_b)) {
            int differ = PyObject_RichCompareBool(values_a, values_b, Py_NE);
            if (differ == 0)
                differ = PyObject_RichCompareBool(base_a, base_b, Py_NE);
            if (differ == 0)
                differ = PyTuple_GET_SIZE(events_a) != PyTuple_GET_SIZE(events_b)
                    || PyObject_RichCompareBool(events_a, events_b, Py_NE);
            if (differ != 0)
                return differ < 0 ? -1 : 0;
        }
    }
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

/* a is b or a == b (states_equal): 1, 0 or -1. */
static int
same_state(const State *st, PyObject *a, PyObject *b)
{
    return a == b ? 1 : states_equal(st, a, b);
}

/* Sender.set_current_state(state, now), its comparisons in C
 * (states_equal) and its subtract too where it can (subtract()). None,
 * or NULL with the exception Python would raise; a sender not of the
 * exact class, or not as the Python code leaves it, calls the method. */
PyObject *
set_state(const State *st, PyObject *sender, PyObject *state, PyObject *now)
{
    PyObject *sent = Py_TYPE(sender) == st->sender_type
        ? SLOT(sender, st->snd.sent) : NULL;
    PyObject *current = Py_TYPE(sender) == st->sender_type
        ? SLOT(sender, st->snd.current) : NULL;
    if (sent == NULL || current == NULL || !PyList_CheckExact(sent)
            || PyList_GET_SIZE(sent) < SENT_STRIDE) {
        PyObject *args[3] = {sender, state, now};
        return PyObject_VectorcallMethod(st->str_set_current_state, args, 3,
                                         NULL);
    }
    /* (held: the comparisons may run code that changes the sender) */
    Py_INCREF(sent);
    Py_INCREF(current);
    PyObject *front = Py_NewRef(PyList_GET_ITEM(sent, 2));
    PyObject *subtracted = subtract(st, state, front);
    PyObject *back = Py_NewRef(PyList_GET_ITEM(sent, PyList_GET_SIZE(sent) - 1));
    PyObject *result = NULL;
    if (subtracted == NULL)
        goto done;
    PyObject *chosen = subtracted;
    int found = same_state(st, subtracted, current);
    if (found > 0)
        chosen = current;
    else if (found == 0 && back != current) {
        found = same_state(st, subtracted, back);
        if (found > 0)
            chosen = back;
    }
    if (found == 0 && front != current && front != back) {
        found = same_state(st, subtracted, front);
        if (found > 0)
            chosen = front;
    }
    if (found < 0)
        goto done;
    slot_set(sender, st->snd.current, chosen);
    if (now != Py_None) {
        PyObject *clock = get_slot(sender, st->snd.mindelay_clock,
                                   "_mindelay_clock");
        if (clock == NULL)
            goto done;
        Py_ssize_t size = PyList_GET_SIZE(sent);
        if (clock == Py_None
                && (size == 0 || chosen != PyList_GET_ITEM(sent, size - 1)))
            slot_set(sender, st->snd.mindelay_clock, now);
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(subtracted);
    Py_DECREF(back);
    Py_DECREF(front);
    Py_DECREF(current);
    Py_DECREF(sent);
    return result;
}

/* SSPSession.next_wakeup() with Sender.next_wakeup() (session.py,
 * sender.py): the earlier of the sender's two deadlines, None for NEVER,
 * a closed session, no address, or sequence numbers awaited. A new
 * reference, or NotImplemented where the Python code must say (another
 * class, a slot not as the Python code leaves it). */
PyObject *
session_wakeup(State *st, PyObject *session)
{
    if (st->session_type == NULL && bind_session_type(st) < 0) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (Py_TYPE(session) != st->session_type)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *flags_object = SLOT(session, st->s.flags);
    PyObject *link = SLOT(session, st->s.link);
    PyObject *sender = SLOT(session, st->s.sender);
    if (flags_object == NULL || !PyLong_CheckExact(flags_object)
            || link == NULL || Py_TYPE(link) != st->link_type
            || sender == NULL || Py_TYPE(sender) != st->sender_type)
        Py_RETURN_NOTIMPLEMENTED;
    long flags = PyLong_AsLong(flags_object);
    if (flags == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *address = SLOT(link, st->l.remote_address);
    if (address == NULL)
        Py_RETURN_NOTIMPLEMENTED;
    if ((flags & st->closed) || address == Py_None)
        Py_RETURN_NONE;
    if (flags & st->seq_requested) {
        /* link.next_seq >= self._seq_reserved: waiting for the confirm */
        PyObject *next_seq = SLOT(link, st->l.next_seq);
        PyObject *reserved = SLOT(session, st->s.seq_reserved);
        if (next_seq == NULL || reserved == NULL
                || !PyLong_CheckExact(next_seq) || !PyLong_CheckExact(reserved))
            Py_RETURN_NOTIMPLEMENTED;
        int waiting = PyObject_RichCompareBool(next_seq, reserved, Py_GE);
        if (waiting < 0) {
            PyErr_Clear();
            Py_RETURN_NOTIMPLEMENTED;
        }
        if (waiting)
            Py_RETURN_NONE;
    }
    PyObject *ack = SLOT(sender, st->snd.next_ack_time);
    PyObject *send = SLOT(sender, st->snd.next_send_time);
    double ack_value, send_value;
    /* exact floats: compared as doubles, as Python compares them */
    if (ack == NULL || send == NULL || !PyFloat_CheckExact(ack)
            || !PyFloat_CheckExact(send) || !PyFloat_CheckExact(st->never))
        Py_RETURN_NOTIMPLEMENTED;
    ack_value = PyFloat_AS_DOUBLE(ack);
    send_value = PyFloat_AS_DOUBLE(send);
    /* (min()'s choice without its call: the first of equal times) */
    PyObject *wakeup = send_value < ack_value ? send : ack;
    if (PyFloat_AS_DOUBLE(wakeup) == PyFloat_AS_DOUBLE(st->never))
        Py_RETURN_NONE;
    return Py_NewRef(wakeup);
}
