/*
 * broker/ssp/_speedups_send.c: the compiled send path of SSPSession, its
 * two usual cases only: the broker's empty acknowledgement (or
 * heartbeat), and a node's new state (a report: a small diff).
 *
 * Why: in the fleet throughput benchmark (issue #5) the send path
 * (datagrams_to_send -> Sender.tick -> Outgoing._send_instruction:
 * protobuf, deflate, fragment header, timestamps, encrypt) is the largest
 * SSP share of the broker's CPU, and nearly every datagram it sends is an
 * empty ack; the node process spends most of a core on its reports.
 *
 * What: send(session, now) is SSPSession.datagrams_to_send (session.py)
 * with Sender.tick, calculate_timers, _send, _add_sent_state, make_chaff
 * (called), serialize_instruction, deflate, Outgoing._send_instruction
 * and DatagramLayer.encode, for a session that: is not closed, not
 * shutting down (ours or the peer's), has an address, is due, has the
 * sequence numbers for one datagram without asking for more, stays
 * attached, and either
 *   - has nothing new to send (an empty diff: its current state is the
 *     acknowledged one, and so is every state in flight, i.e. earlier
 *     empty acks not acknowledged yet) and does not ask for acks, or
 *   - has a new state (current is not the last sent: not a
 *     retransmission) whose diff, as tick chooses it (the prospective
 *     resend included; DeviceState.diff_from is called, it is pure), is
 *     not empty and makes an instruction of at most RAW_SIZE bytes.
 * It returns the list of (datagram, address) pairs, or None to hand over
 * before changing anything.
 *
 * The rule and the two phases are the receive path's (_speedups.c): every
 * check first; then the changes in the Python code's order. The chaff
 * comes from make_chaff(random_bytes) called in the change phase, so the
 * randomness is consumed as the Python code consumes it. A nonce is used
 * once: next_seq moves before the seal exactly as DatagramLayer.encode
 * moves it, and the reservation is checked as _send_instruction does.
 */

#include "_speedups.h"

#ifdef SP_HAVE_ZLIB
#include <zlib.h>
#endif

/* The longest protobuf written here (7 tags, version, four u64 varints,
 * the diff with its length, at most 16 bytes of chaff): a new state whose
 * instruction could be longer is handed over. Past SMALL_INSTRUCTION the
 * bytes are deflated by instruction.deflate (zlib.compress), as Python
 * does; deflated they still fit one fragment of either framing. */
#define RAW_SIZE 512
#define CHAFF_MAX 16
#define DEFLATED_SIZE 256
#define FRAGMENT_HEADER 10

typedef struct {
    /* strong references, taken where the checks read them: the changes
     * allocate and call Python (the cyclic GC, __del__, random_bytes,
     * the cipher) and the session's slots may be replaced meanwhile */
    PyObject *link, *sender, *address, *header, *next_ack, *new_num,
        *old_num, *ack_num, *sent, *current;
    /* a new state: its diff (NULL: the empty ack's EMPTY_DIFF), the
     * front's number (throwaway_num; old_num is the assumed state's) and
     * tick's calculate_timers' _next_send_time */
    PyObject *diff, *throwaway_num, *next_send;
    uint64_t next_seq, old, new, ack, reserved, throwaway;
    int direction, has_reserved;
    long long saved, saved_at;
    long long cap;
    long long now_ms;
    long timestamp, reply;
    int clear_saved;
} Send;

static void
send_clear(Send *s)
{
    Py_CLEAR(s->link);
    Py_CLEAR(s->sender);
    Py_CLEAR(s->address);
    Py_CLEAR(s->header);
    Py_CLEAR(s->next_ack);
    Py_CLEAR(s->new_num);
    Py_CLEAR(s->old_num);
    Py_CLEAR(s->ack_num);
    Py_CLEAR(s->sent);
    Py_CLEAR(s->current);
    Py_CLEAR(s->diff);
    Py_CLEAR(s->throwaway_num);
    Py_CLEAR(s->next_send);
}

/* An exact int that fits a long long: 0, or -1 (no exception). */
static int
as_i64(PyObject *obj, long long *out)
{
    if (obj == NULL || !PyLong_CheckExact(obj))
        return -1;
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (*out == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* Whether the link still holds what the checks read (the sequence number,
 * the direction, the saved timestamp): the Python calls of the change
 * phase (random_bytes, the cipher provider) could have sent on this
 * session. If not, the Python code continues from there, reading them
 * afresh as it does: a nonce is never taken from a stale next_seq. */
static int
link_unchanged(const State *st, const Send *s)
{
    uint64_t seq;
    long long direction, saved, saved_at;
    PyObject *link = s->link;
    return as_u64(SLOT(link, st->l.next_seq), &seq) == 0
        && seq == s->next_seq
        && as_i64(SLOT(link, st->l.direction_out), &direction) == 0
        && direction == s->direction
        && as_i64(SLOT(link, st->l.saved_timestamp), &saved) == 0
        && saved == s->saved
        && as_i64(SLOT(link, st->l.saved_timestamp_at), &saved_at) == 0
        && saved_at == s->saved_at;
}

/* Whether the session still holds the header and reservation the checks
 * read (see link_unchanged). */
static int
session_unchanged(const State *st, const Send *s, PyObject *session)
{
    uint64_t reserved;
    PyObject *reserved_object = SLOT(session, st->s.seq_reserved);
    if (SLOT(session, st->s.header) != s->header || reserved_object == NULL)
        return 0;
    if (reserved_object == Py_None) {
        if (s->has_reserved)
            return 0;
    }
    else if (!s->has_reserved || as_u64(reserved_object, &reserved) < 0
             || reserved != s->reserved)
        return 0;
    return link_unchanged(st, s);
}

/* a < b as Python compares them (exact floats and ints only, which
 * compare without side effects): 1, 0, or -1 for anything else. */
static int
less_than(PyObject *a, PyObject *b)
{
    if (a == NULL || b == NULL
            || !(PyFloat_CheckExact(a) || PyLong_CheckExact(a))
            || !(PyFloat_CheckExact(b) || PyLong_CheckExact(b)))
        return -1;
    int result = PyObject_RichCompareBool(a, b, Py_LT);
    if (result < 0)
        PyErr_Clear();
    return result;
}

/* Sender.tick with nothing new to send: the acknowledged state is
 * current (the diff from it is EMPTY_DIFF: DeviceState.diff_from of
 * itself), and every state in flight after it is that state too: earlier
 * empty acks the peer has not acknowledged yet. tick then computes an
 * assumed index (_assumed_index, retransmit_timeout: reads only, of the
 * times, the profile, _backoff and rtt.rto), but the diff from the front
 * is empty, shorter than PROSPECTIVE_RESEND_SLACK, so it sends that one:
 * old_num is the front's whatever the index. No ASKS_ACKS (datagrams_to_
 * send replaces the empty diff with the state's ask). */
static int
check_empty_ack(const State *st, PyObject *sender, PyObject *link,
                PyObject *sent, Py_ssize_t size, PyObject *current,
                long flags, PyObject *now)
{
    if ((flags & st->asks_acks) || current != PyList_GET_ITEM(sent, 2))
        return HAND_OVER;
    if (size > SENT_STRIDE) {
        PyObject *rtt = SLOT(link, st->l.rtt);
        PyObject *backoff = SLOT(sender, st->snd.backoff);
        long long backoff_value;
        if (rtt == NULL || Py_TYPE(rtt) != st->rtt_type
                || as_i64(backoff, &backoff_value) < 0
                || backoff_value < 0 || backoff_value > 62)
            return HAND_OVER;
        for (Py_ssize_t i = SENT_STRIDE; i < size; i += SENT_STRIDE) {
            PyObject *time = PyList_GET_ITEM(sent, i);
            if (!(PyFloat_CheckExact(time) || PyLong_CheckExact(time))
                    || PyList_GET_ITEM(sent, i + 2) != current)
                return HAND_OVER;
        }
    }
    /* tick: calculate_timers sets _next_send_time = NEVER here (current
     * is the front), so the tick is due unless now < _next_ack_time */
    if (less_than(now, SLOT(sender, st->snd.next_ack_time)) != 0)
        return HAND_OVER;
    return GO;
}

/* Sender.tick with a new state to send (current is not sent[-1]), up to
 * the diff: calculate_timers' _next_send_time (the first branch:
 * max(clock + send_mindelay, back_time + send_interval(srtt)), the clock
 * now where none is set; the ack time is left alone without a shutdown,
 * ours or the peer's, which the caller checks), the tick due (not now <
 * both times), and the assumed index (_assumed_index(now,
 * retransmit_timeout(rtt)) when states are in flight, else 0). */
static int
check_new_state(const State *st, Send *s, PyObject *sender, PyObject *link,
                PyObject *profile, PyObject *sent, Py_ssize_t size,
                PyObject *now, Py_ssize_t *assumed)
{
    Timing t;
    double now_value, back_time, clock, interval, rto;
    PyObject *rtt = SLOT(link, st->l.rtt);
    PyObject *clock_object = SLOT(sender, st->snd.mindelay_clock);
    if (timing_of(st, profile, &t) < 0
            || rtt == NULL || Py_TYPE(rtt) != st->rtt_type
            || clock_object == NULL || time_of(now, &now_value) < 0
            || time_of(PyList_GET_ITEM(sent, size - SENT_STRIDE),
                       &back_time) < 0
            || send_interval(st, &t, rtt, &interval) < 0)
        return HAND_OVER;
    if (clock_object == Py_None)
        clock = now_value;
    else if (time_of(clock_object, &clock) < 0)
        return HAND_OVER;
    /* (max()'s choice without its call: the first of equal times.) */
    double earliest = clock + t.send_mindelay;
    double paced = back_time + interval;
    double next_send = paced > earliest ? paced : earliest;
    /* if now < self._next_ack_time and now < self._next_send_time:
     * return None (the clock set: the Python code does it) */
    int early = less_than(now, SLOT(sender, st->snd.next_ack_time));
    if (early < 0 || (early && now_value < next_send))
        return HAND_OVER;
    *assumed = 0;
    if (size > SENT_STRIDE
            && (retransmit_timeout(st, &t, sender, rtt, &rto) < 0
                || (*assumed = assumed_index(&t, sent, now_value, rto)) < 0))
        return HAND_OVER;
    s->next_send = PyFloat_FromDouble(next_send);
    return s->next_send == NULL ? HAND_OVER : GO;
}

/* current.diff_from(base): exact bytes (a new reference), or NULL (no
 * exception: an error is cleared, the Python code meets it again). The
 * usual diff, values only, is written in C (diff_values). */
static PyObject *
diff_from(const State *st, PyObject *current, PyObject *base)
{
    Py_INCREF(base);
    PyObject *diff = diff_values(st, current, base);
    if (diff != NULL) {
        Py_DECREF(base);
        return diff;
    }
    PyObject *args[2] = {current, base};
    diff = PyObject_VectorcallMethod(
        st->str_diff_from, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(base);
    if (diff == NULL || !PyBytes_CheckExact(diff)) {
        PyErr_Clear();
        Py_XDECREF(diff);
        return NULL;
    }
    return diff;
}

/* make_chaff(random_bytes): a new reference, or NULL with an exception.
 * From a BufferedRandom whose block holds the CHAFF_MAX + 1 bytes asked,
 * they are taken here as its __call__ takes them (the same bytes, the
 * same position after); anything else calls make_chaff. */
static PyObject *
take_chaff(const State *st, PyObject *random_bytes)
{
    if (Py_TYPE(random_bytes) == st->buffered_random_type) {
        PyObject *buffer = SLOT(random_bytes, st->br.buffer);
        PyObject *position = SLOT(random_bytes, st->br.position);
        Py_ssize_t start = -1;
        if (buffer != NULL && PyBytes_CheckExact(buffer)
                && position != NULL && PyLong_CheckExact(position)) {
            start = PyLong_AsSsize_t(position);
            if (start == -1)
                PyErr_Clear();
        }
        if (start >= 0 && start <= PyBytes_GET_SIZE(buffer) - (CHAFF_MAX + 1)) {
            const unsigned char *data =
                (const unsigned char *)PyBytes_AS_STRING(buffer) + start;
            PyObject *end = PyLong_FromSsize_t(start + CHAFF_MAX + 1);
            if (end == NULL)
                return NULL;
            PyObject *chaff = PyBytes_FromStringAndSize(
                (const char *)data + 1, data[0] % (CHAFF_MAX + 1));
            if (chaff != NULL)
                slot_set(random_bytes, st->br.position, end);
            Py_DECREF(end);
            return chaff;
        }
    }
    return PyObject_CallOneArg(st->make_chaff, random_bytes);
}

static Py_ssize_t
varint_size(uint64_t value)
{
    Py_ssize_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

/* The last check of a new state: tick's diff, as it chooses it (pure
 * Python calls of DeviceState.diff_from, in tick's order: from the front,
 * then, when that one is not shorter than the slack, from the assumed
 * state), sets s->diff and old_num. HAND_OVER for an empty diff, one
 * that raised, or an instruction longer than RAW_SIZE. */
static int
check_diff(const State *st, Send *s, Py_ssize_t assumed)
{
    PyObject *sent = s->sent, *current = s->current;
    Py_ssize_t size = PyList_GET_SIZE(sent);
    PyObject *diff = diff_from(st, current, PyList_GET_ITEM(sent, 2));
    if (diff == NULL)
        return HAND_OVER;
    if (assumed) {
        /* prospective resend: resend = the diff from the front */
        Py_ssize_t resend = PyBytes_GET_SIZE(diff);
        if (resend < st->prospective_resend_slack)
            assumed = 0;
        else {
            /* (the held list cannot shrink but by code run meanwhile) */
            if (PyList_GET_SIZE(sent) != size) {
                Py_DECREF(diff);
                return HAND_OVER;
            }
            PyObject *other = diff_from(st, current,
                                        PyList_GET_ITEM(sent, assumed + 2));
            if (other == NULL) {
                Py_DECREF(diff);
                return HAND_OVER;
            }
            Py_ssize_t length = PyBytes_GET_SIZE(other);
            if (resend <= length
                    || (resend < st->prospective_resend_limit
                        && resend - length < st->prospective_resend_slack)) {
                assumed = 0;
                Py_DECREF(other);
            }
            else {
                Py_DECREF(diff);
                diff = other;
            }
        }
    }
    s->diff = diff;
    Py_ssize_t length = PyBytes_GET_SIZE(diff);
    /* not diff: tick's empty ack (the Python code) */
    if (length == 0 || PyList_GET_SIZE(sent) != size)
        return HAND_OVER;
    /* diff_from's allocations may run Python code (a gc callback, a
     * finalizer) that sends on this session: tick reads _next_num() and
     * self._sent after the diff, so numbers and entries taken from the
     * list read before would be stale (the new state would get the number
     * that send just used). Hand over: nothing has changed yet. */
    if (SLOT(s->sender, st->snd.sent) != sent
            || SLOT(s->sender, st->snd.current) != current)
        return HAND_OVER;
    s->old_num = Py_NewRef(PyList_GET_ITEM(sent, assumed + 1));
    if (as_u64(s->old_num, &s->old) < 0)
        return HAND_OVER;
    /* serialize(): 7 tags, the varints, the diff and its length, the
     * chaff's length byte and at most CHAFF_MAX bytes */
    Py_ssize_t raw = 7 + varint_size((uint64_t)st->protocol_version)
        + varint_size(s->old) + varint_size(s->new) + varint_size(s->ack)
        + varint_size(s->throwaway) + varint_size((uint64_t)length) + length
        + 1 + CHAFF_MAX;
    return raw <= RAW_SIZE ? GO : HAND_OVER;
}

/* Every check of the fast case but the diff (check_diff); fills *s.
 * GO or HAND_OVER (nothing changed either way). */
static int
check_send(const State *st, Send *s, PyObject *session, PyObject *now,
           Py_ssize_t *assumed)
{
    if (Py_TYPE(session) != st->session_type)
        return HAND_OVER;
    /* datagrams_to_send: if flags & CLOSED: return [] */
    PyObject *flags_object = SLOT(session, st->s.flags);
    if (flags_object == NULL || !PyLong_CheckExact(flags_object))
        return HAND_OVER;
    long flags = PyLong_AsLong(flags_object);
    if (flags == -1 && PyErr_Occurred())
        return HAND_OVER;
    if (flags & st->closed)
        return HAND_OVER;
    PyObject *sender = SLOT(session, st->s.sender);
    PyObject *link = SLOT(session, st->s.link);
    if (sender == NULL || Py_TYPE(sender) != st->sender_type
            || link == NULL || Py_TYPE(link) != st->link_type)
        return HAND_OVER;
    s->sender = Py_NewRef(sender);
    s->link = Py_NewRef(link);
    /* shutdown_timed_out: False when _shutdown is None; _next_num and
     * calculate_timers: no shutdown */
    if (SLOT(sender, st->snd.shutdown) != Py_None)
        return HAND_OVER;
    /* address = link.remote_address; None: [] */
    s->address = Py_XNewRef(SLOT(link, st->l.remote_address));
    if (s->address == NULL || s->address == Py_None)
        return HAND_OVER;
    /* now: a float, or an int that int(now * 1000) takes exactly */
    double now_value;
    if (PyFloat_CheckExact(now)) {
        now_value = PyFloat_AS_DOUBLE(now);
        double ms = now_value * 1000.0;
        if (!(fabs(ms) < 4.0e18))
            return HAND_OVER;
        s->now_ms = (long long)ms;  /* int(): truncation toward zero */
    }
    else if (PyLong_CheckExact(now)) {
        long long whole;
        if (as_i64(now, &whole) < 0 || whole > (1LL << 40)
                || whole < -(1LL << 40))
            return HAND_OVER;
        s->now_ms = whole * 1000;
    }
    else
        return HAND_OVER;
    /* the sequence number: seal() takes 0 <= seq < 2**63 */
    if (as_u64(SLOT(link, st->l.next_seq), &s->next_seq) < 0
            || s->next_seq > SEQ_MASK)
        return HAND_OVER;
    /* the reservation: one datagram (count 1) without a request:
     * next_seq + 1 <= reserved and reserved - (next_seq + 1) >= block // 2
     * (so also next_seq < reserved, datagrams_to_send's own test) */
    PyObject *reserved_object = SLOT(session, st->s.seq_reserved);
    if (reserved_object == NULL)
        return HAND_OVER;
    if (reserved_object != Py_None) {
        uint64_t reserved;
        if (as_u64(reserved_object, &reserved) < 0
                || s->next_seq + 1 > reserved
                || reserved - (s->next_seq + 1)
                   < (uint64_t)(st->seq_reservation_block / 2))
            return HAND_OVER;
        s->has_reserved = 1;
        s->reserved = reserved;
    }
    PyObject *sent = SLOT(sender, st->snd.sent);
    PyObject *current = SLOT(sender, st->snd.current);
    PyObject *profile = SLOT(sender, st->snd.profile);
    Py_ssize_t size;
    if (sent == NULL || !PyList_CheckExact(sent)
            || (size = PyList_GET_SIZE(sent)) < SENT_STRIDE
            || size % SENT_STRIDE != 0 || current == NULL
            || Py_TYPE(current) != st->state_type
            || profile == NULL || Py_TYPE(profile) != st->profile_type)
        return HAND_OVER;
    if (current != PyList_GET_ITEM(sent, size - 1)) {
        /* a new state (current is not sent[-1]) */
        if (check_new_state(st, s, sender, link, profile, sent, size, now,
                            assumed) != GO)
            return HAND_OVER;
    }
    else if (check_empty_ack(st, sender, link, sent, size, current, flags,
                             now) != GO)
        return HAND_OVER;
    s->sent = Py_NewRef(sent);
    s->current = Py_NewRef(current);
    /* the numbers: throwaway_num = sent[1] (the front); _next_num() =
     * max(back + 1, _first_num) with back = sent[-2]; the ack, not the
     * peer's shutdown (UINT64_MAX) */
    PyObject *first = SLOT(sender, st->snd.first_num);
    uint64_t first_num, back;
    s->throwaway_num = Py_NewRef(PyList_GET_ITEM(sent, 1));
    s->ack_num = Py_XNewRef(SLOT(sender, st->snd.ack_num));
    if (as_u64(s->throwaway_num, &s->throwaway) < 0
            || as_u64(PyList_GET_ITEM(sent, size - 2), &back) < 0
            || back >= UINT64_MAX_VALUE - 1
            || as_u64(first, &first_num) < 0
            || first_num >= UINT64_MAX_VALUE
            || as_u64(s->ack_num, &s->ack) < 0
            || s->ack == UINT64_MAX_VALUE)
        return HAND_OVER;
    if (s->next_send == NULL) {
        /* the empty ack: old_num is the front's too */
        s->old_num = Py_NewRef(s->throwaway_num);
        s->old = s->throwaway;
    }
    /* _send: interval = profile.ack_interval; NEVER or now + interval.
     * _add_sent_state: the entries grow by three; past the cap (at least
     * 2) one is erased from the middle (change_send). */
    PyObject *interval = SLOT(profile, st->p.ack_interval);
    PyObject *cap = SLOT(profile, st->p.sent_states_cap);
    long long cap_value;
    if (interval == NULL || !(PyFloat_CheckExact(interval)
                              || PyLong_CheckExact(interval))
            || as_i64(cap, &cap_value) < 0 || cap_value < 2)
        return HAND_OVER;
    s->cap = cap_value;
    int never = PyObject_RichCompareBool(interval, st->never, Py_EQ);
    if (never < 0) {
        PyErr_Clear();
        return HAND_OVER;
    }
    s->next_ack = never ? Py_NewRef(st->never)
        : PyNumber_Add(now, interval);
    if (s->next_ack == NULL) {
        PyErr_Clear();
        return HAND_OVER;
    }
    if (first_num > back + 1)
        s->new = first_num, s->new_num = Py_NewRef(first);
    else {
        s->new = back + 1;
        s->new_num = PyLong_FromUnsignedLongLong(s->new);
        if (s->new_num == NULL) {
            PyErr_Clear();
            return HAND_OVER;
        }
    }
    /* _send_instruction: the header (None, or the broker's) */
    s->header = Py_XNewRef(SLOT(session, st->s.header));
    if (s->header == NULL || (s->header != Py_None
            && !(PyBytes_CheckExact(s->header)
                 && PyBytes_GET_SIZE(s->header) == st->header_size)))
        return HAND_OVER;
    PyObject *ciphers = SLOT(session, st->s.ciphers);
    PyObject *key = SLOT(session, st->s.key);
    PyObject *random_bytes = SLOT(session, st->s.random_bytes);
    if (ciphers == NULL || key == NULL || random_bytes == NULL)
        return HAND_OVER;
    /* DatagramLayer.encode: the direction, the timestamps */
    long long direction, saved, saved_at;
    if (as_i64(SLOT(link, st->l.direction_out), &direction) < 0
            || (direction != 0 && direction != 1)
            || as_i64(SLOT(link, st->l.saved_timestamp), &saved) < 0
            || as_i64(SLOT(link, st->l.saved_timestamp_at), &saved_at) < 0
            || saved > (1LL << 40) || saved_at > (1LL << 61)
            || saved_at < -(1LL << 61))
        return HAND_OVER;
    s->direction = (int)direction;
    s->saved = saved;
    s->saved_at = saved_at;
    s->timestamp = (long)(s->now_ms & 0xFFFF);
    if (s->timestamp == st->no_timestamp)
        s->timestamp = 0;
    s->reply = st->no_timestamp;
    s->clear_saved = saved >= 0;
    if (s->clear_saved) {
        long long held = s->now_ms - saved_at;
        /* held < ECHO_WINDOW * 1000: an int against a float, exact for
         * an int a double holds exactly */
        if (llabs(held) >= (1LL << 52))
            return HAND_OVER;
        if ((double)held < st->echo_window_ms)
            s->reply = (long)((saved + held) & 0xFFFF);
    }
    /* datagrams_to_send: the server's association timeout (detach) */
    if (flags & st->server) {
        PyObject *last_heard = SLOT(link, st->l.last_heard);
        if (last_heard == NULL)
            return HAND_OVER;
        if (last_heard != Py_None) {
            PyObject *timeout = SLOT(profile,
                                     st->p.server_association_timeout);
            if (timeout == NULL || !(PyFloat_CheckExact(last_heard)
                                     || PyLong_CheckExact(last_heard)))
                return HAND_OVER;
            PyObject *since = PyNumber_Subtract(now, last_heard);
            if (since == NULL) {
                PyErr_Clear();
                return HAND_OVER;
            }
            int late = PyFloat_CheckExact(timeout)
                || PyLong_CheckExact(timeout)
                ? PyObject_RichCompareBool(since, timeout, Py_GT) : -1;
            Py_DECREF(since);
            if (late != 0) {
                PyErr_Clear();
                return HAND_OVER;
            }
        }
    }
    return GO;
}

/* ---------------------------------------------------------------------
 * The instruction's bytes.
 * ------------------------------------------------------------------ */

static unsigned char *
put_varint(unsigned char *p, uint64_t value)
{
    while (value >= 0x80) {
        *p++ = (unsigned char)(value | 0x80);
        value >>= 7;
    }
    *p++ = (unsigned char)value;
    return p;
}

/* serialize_instruction: all seven fields in order (proto2: set means
 * present, an empty diff too), into RAW_SIZE bytes (check_diff bounds a
 * diff). Returns the length. */
static Py_ssize_t
serialize(const State *st, const Send *s, const char *chaff,
          Py_ssize_t chaff_len, unsigned char *out)
{
    Py_ssize_t diff_len = s->diff == NULL ? 0 : PyBytes_GET_SIZE(s->diff);
    unsigned char *p = out;
    *p++ = 0x08;
    p = put_varint(p, (uint64_t)st->protocol_version);
    *p++ = 0x10;
    p = put_varint(p, s->old);
    *p++ = 0x18;
    p = put_varint(p, s->new);
    *p++ = 0x20;
    p = put_varint(p, s->ack);
    *p++ = 0x28;
    p = put_varint(p, s->throwaway);  /* the front, sent[1] */
    *p++ = 0x32;
    p = put_varint(p, (uint64_t)diff_len);  /* 0: EMPTY_DIFF */
    if (diff_len) {
        memcpy(p, PyBytes_AS_STRING(s->diff), (size_t)diff_len);
        p += diff_len;
    }
    *p++ = 0x3a;
    *p++ = (unsigned char)chaff_len;
    memcpy(p, chaff, (size_t)chaff_len);
    p += chaff_len;
    return p - out;
}

/* zlib at level 6, window 15, memLevel 1 for a short instruction, from
 * the module's one stream (deflateInit2 as compressobj(6, DEFLATED, 15, 1)
 * once, then deflateReset: a fresh stream's bytes each time, without
 * setting one up per instruction). A new reference; or NULL, with an
 * exception if one was raised, or without one where this cannot say: no
 * zlib linked, an instruction too long, no stream, no room. */
PyObject *
deflate_short(State *st, const unsigned char *raw, Py_ssize_t size)
{
    if (size > st->small_instruction)
        return NULL;
    /* Nearly always: zlib's bytes without zlib (_speedups_deflate.c). */
    PyObject *tiny = deflate_tiny(raw, size);
    if (tiny != NULL || PyErr_Occurred())
        return tiny;
#ifdef SP_HAVE_ZLIB
    z_stream *stream = (z_stream *)st->deflater;
    if (stream == NULL) {
        stream = PyMem_Calloc(1, sizeof(z_stream));
        if (stream != NULL && deflateInit2(stream, 6, Z_DEFLATED, 15, 1,
                                           Z_DEFAULT_STRATEGY) != Z_OK) {
            PyMem_Free(stream);
            stream = NULL;
        }
        st->deflater = stream;
    }
    if (stream != NULL && deflateReset(stream) == Z_OK) {
        unsigned char out[DEFLATED_SIZE];
        stream->next_in = (Bytef *)raw;
        stream->avail_in = (uInt)size;
        stream->next_out = out;
        stream->avail_out = (uInt)sizeof(out);
        int status = deflate(stream, Z_FINISH);
        Py_ssize_t done = (Py_ssize_t)(sizeof(out) - stream->avail_out);
        stream->next_in = NULL;
        stream->next_out = NULL;
        if (status == Z_STREAM_END)
            return PyBytes_FromStringAndSize((const char *)out, done);
    }
#else
    (void)st;
    (void)raw;
    (void)size;
#endif
    return NULL;
}

/* instruction.deflate(raw): deflate_short's bytes, or where it cannot say,
 * the Python function's (which decides as zlib.compress() would). A new
 * reference, or NULL with an exception. */
static PyObject *
deflate_raw(State *st, const unsigned char *raw, Py_ssize_t size)
{
    PyObject *result = deflate_short(st, raw, size);
    if (result != NULL || PyErr_Occurred())
        return result;
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)raw, size);
    if (bytes == NULL)
        return NULL;
    result = PyObject_CallOneArg(st->deflate, bytes);
    Py_DECREF(bytes);
    return result;
}

/* The module's deflate stream, if one was made (module_clear). */
void
send_free(State *st)
{
#ifdef SP_HAVE_ZLIB
    z_stream *stream = (z_stream *)st->deflater;
    if (stream != NULL) {
        deflateEnd(stream);
        PyMem_Free(stream);
    }
#endif
    st->deflater = NULL;
}

/* ---------------------------------------------------------------------
 * The changes.
 * ------------------------------------------------------------------ */

/* The Python continuation after the sender's changes, for what C does
 * not write out (a chaff that is not bytes, an instruction too long for
 * one fragment; neither happens with make_chaff and the diffs taken):
 * self._send_instruction(inst, address, now). New reference or NULL. */
static PyObject *
send_in_python(const State *st, const Send *s, PyObject *session,
               PyObject *now, PyObject *chaff)
{
    PyObject *version = PyLong_FromLong(st->protocol_version);
    PyObject *diff = s->diff != NULL ? Py_NewRef(s->diff)
        : PyBytes_FromStringAndSize("", 0);
    PyObject *fields = NULL, *inst = NULL, *out = NULL;
    if (version == NULL || diff == NULL)
        goto done;
    fields = PyTuple_Pack(7, version, s->old_num, s->new_num, s->ack_num,
                          s->throwaway_num, diff, chaff);
    if (fields == NULL)
        goto done;
    /* tuple.__new__(Instruction, fields), as Sender._send builds it */
    PyObject *new_args = PyTuple_Pack(1, fields);
    if (new_args == NULL)
        goto done;
    inst = PyTuple_Type.tp_new((PyTypeObject *)st->instruction_class,
                               new_args, NULL);
    Py_DECREF(new_args);
    if (inst == NULL)
        goto done;
    PyObject *args[4] = {session, inst, s->address, now};
    out = PyObject_VectorcallMethod(st->str_send_instruction, args, 4, NULL);
done:
    Py_XDECREF(version);
    Py_XDECREF(diff);
    Py_XDECREF(fields);
    Py_XDECREF(inst);
    return out;
}

/* An OCBCipher's seal, written into the datagram: prefix | nonce (the
 * last 8 bytes of the AEAD nonce) | ciphertext | tag. Takes the cipher's
 * and the plaintext's references. */
static PyObject *
seal_in_place(const Send *s, PyObject *cipher, PyObject *plaintext,
              const unsigned char *nonce)
{
    Py_ssize_t prefix = s->header == Py_None ? 0
        : PyBytes_GET_SIZE(s->header);
    Py_ssize_t size = PyBytes_GET_SIZE(plaintext);
    PyObject *datagram = PyBytes_FromStringAndSize(
        NULL, prefix + NONCE_SIZE + size + 16);
    if (datagram != NULL) {
        unsigned char *d = (unsigned char *)PyBytes_AS_STRING(datagram);
        if (prefix)
            memcpy(d, PyBytes_AS_STRING(s->header), (size_t)prefix);
        memcpy(d + prefix, nonce + 4, NONCE_SIZE);
        if (ocb_seal(cipher, nonce, NULL, 0,
                     (const unsigned char *)PyBytes_AS_STRING(plaintext),
                     size, d + prefix + NONCE_SIZE) < 0)
            Py_CLEAR(datagram);
    }
    Py_DECREF(cipher);
    Py_DECREF(plaintext);
    return datagram;
}

/* DatagramLayer.encode and seal for the one fragment: the datagram (new
 * reference) or NULL with the exception the Python code would raise. */
static PyObject *
encode(const State *st, const Send *s, PyObject *session, PyObject *now,
       PyObject *compressed)
{
    PyObject *link = s->link;
    /* cipher = self._ciphers.get(self._key): read afresh (random_bytes
     * ran since the checks); a deleted slot is Python's AttributeError */
    PyObject *ciphers = get_slot(session, st->s.ciphers, "_ciphers");
    if (ciphers == NULL)
        return NULL;
    PyObject *key = get_slot(session, st->s.key, "_key");
    if (key == NULL)
        return NULL;
    PyObject *cipher = cipher_for(st, ciphers, key);
    if (cipher == NULL)
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(compressed);
    if (!link_unchanged(st, s)) {
        /* link.encode(cipher, payload, now, prefix), in Python */
        PyObject *payload = PyBytes_FromStringAndSize(
            NULL, FRAGMENT_HEADER + size);
        PyObject *prefix = s->header == Py_None
            ? PyBytes_FromStringAndSize("", 0) : Py_NewRef(s->header);
        PyObject *datagram = NULL;
        if (payload != NULL && prefix != NULL) {
            unsigned char *q = (unsigned char *)PyBytes_AS_STRING(payload);
            uint64_t id = s->next_seq + 1;
            for (int i = 0; i < 8; i++)
                q[i] = (unsigned char)(id >> (56 - 8 * i));
            q[8] = (unsigned char)(st->final_bit >> 8);
            q[9] = (unsigned char)st->final_bit;
            memcpy(q + FRAGMENT_HEADER, PyBytes_AS_STRING(compressed),
                   (size_t)size);
            PyObject *args[5] = {link, cipher, payload, now, prefix};
            datagram = PyObject_VectorcallMethod(st->str_encode, args, 5,
                                                 NULL);
        }
        Py_XDECREF(payload);
        Py_XDECREF(prefix);
        Py_DECREF(cipher);
        return datagram;
    }
    PyObject *plaintext = PyBytes_FromStringAndSize(
        NULL, TIMESTAMP_SIZE + FRAGMENT_HEADER + size);
    if (plaintext == NULL) {
        Py_DECREF(cipher);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(plaintext);
    p[0] = (unsigned char)(s->timestamp >> 8);
    p[1] = (unsigned char)s->timestamp;
    p[2] = (unsigned char)(s->reply >> 8);
    p[3] = (unsigned char)s->reply;
    /* _fragment_header(fragment_id = next_seq + 1, FINAL_BIT) */
    uint64_t fragment_id = s->next_seq + 1;
    for (int i = 0; i < 8; i++)
        p[4 + i] = (unsigned char)(fragment_id >> (56 - 8 * i));
    p[12] = (unsigned char)(st->final_bit >> 8);
    p[13] = (unsigned char)st->final_bit;
    memcpy(p + 14, PyBytes_AS_STRING(compressed), (size_t)size);
    /* echo each received timestamp at most once */
    if (s->clear_saved) {
        PyObject *minus_one = PyLong_FromLong(-1);
        PyObject *zero = PyLong_FromLong(0);
        if (minus_one == NULL || zero == NULL) {
            Py_XDECREF(minus_one);
            Py_XDECREF(zero);
            Py_DECREF(cipher);
            Py_DECREF(plaintext);
            return NULL;
        }
        slot_set(link, st->l.saved_timestamp, minus_one);
        slot_set(link, st->l.saved_timestamp_at, zero);
        Py_DECREF(minus_one);
        Py_DECREF(zero);
    }
    /* self.next_seq = seq + 1, before the seal: an encrypt that re-enters
     * and sends takes the next number, never this one (a failed encrypt
     * burns it, which is safe) */
    PyObject *next = PyLong_FromUnsignedLongLong(s->next_seq + 1);
    if (next == NULL) {
        Py_DECREF(cipher);
        Py_DECREF(plaintext);
        return NULL;
    }
    slot_set(link, st->l.next_seq, next);
    Py_DECREF(next);
    /* seal: cipher.encrypt(aead_nonce(nonce_value), plaintext, None) */
    uint64_t nonce_value = ((uint64_t)s->direction << 63) | s->next_seq;
    unsigned char nonce[12] = {0};
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (unsigned char)(nonce_value >> (56 - 8 * i));
    if (is_ocb_cipher(cipher))
        return seal_in_place(s, cipher, plaintext, nonce);
    PyObject *nonce_bytes = PyBytes_FromStringAndSize((const char *)nonce,
                                                      12);
    PyObject *sealed = NULL;
    if (nonce_bytes != NULL) {
        PyObject *args[4] = {cipher, nonce_bytes, plaintext, Py_None};
        sealed = PyObject_VectorcallMethod(st->str_encrypt, args, 4, NULL);
    }
    Py_DECREF(cipher);
    Py_DECREF(plaintext);
    Py_XDECREF(nonce_bytes);
    if (sealed == NULL)
        return NULL;
    /* b"".join((prefix, nonce8, sealed)) */
    Py_ssize_t prefix = s->header == Py_None ? 0
        : PyBytes_GET_SIZE(s->header);
    PyObject *datagram;
    if (PyBytes_CheckExact(sealed)) {
        Py_ssize_t sealed_size = PyBytes_GET_SIZE(sealed);
        datagram = PyBytes_FromStringAndSize(
            NULL, prefix + NONCE_SIZE + sealed_size);
        if (datagram != NULL) {
            char *d = PyBytes_AS_STRING(datagram);
            if (prefix)
                memcpy(d, PyBytes_AS_STRING(s->header), (size_t)prefix);
            memcpy(d + prefix, nonce + 4, NONCE_SIZE);
            memcpy(d + prefix + NONCE_SIZE, PyBytes_AS_STRING(sealed),
                   (size_t)sealed_size);
        }
    }
    else {
        PyObject *empty = PyBytes_FromStringAndSize("", 0);
        PyObject *head = PyBytes_FromStringAndSize(
            prefix ? PyBytes_AS_STRING(s->header) : "", prefix);
        PyObject *wire = PyBytes_FromStringAndSize((const char *)nonce + 4,
                                                   NONCE_SIZE);
        PyObject *parts = (empty && head && wire)
            ? PyTuple_Pack(3, head, wire, sealed) : NULL;
        datagram = parts ? PyObject_CallMethodOneArg(empty, st->str_join,
                                                     parts) : NULL;
        Py_XDECREF(empty);
        Py_XDECREF(head);
        Py_XDECREF(wire);
        Py_XDECREF(parts);
    }
    Py_DECREF(sealed);
    return datagram;
}

/* The changes, in the Python code's order; the list of datagrams, or
 * NULL with the exception the Python code would raise. */
static PyObject *
change_send(State *st, Send *s, PyObject *session, PyObject *now)
{
    PyObject *sender = s->sender;
    PyObject *sent = s->sent;  /* held: the allocation below may run code */
    /* tick: calculate_timers (_next_send_time = NEVER, or for a new state
     * its send time: its _mindelay_clock, when it sets one, is None again
     * before anything runs), then self._mindelay_clock = None */
    slot_set(sender, st->snd.next_send_time,
             s->next_send != NULL ? s->next_send : st->never);
    slot_set(sender, st->snd.mindelay_clock, Py_None);
    /* _send -> _add_sent_state: self._sent = sent + [now, num, current],
     * then, past cap * STRIDE entries, the entry at start = len - (cap //
     * 2) * STRIDE erased (never the front: start >= 2 * STRIDE; the new
     * one itself when cap // 2 is 1, as in the Python code) */
    Py_ssize_t size = PyList_GET_SIZE(sent);
    Py_ssize_t full = size + SENT_STRIDE, start = full;
    if (full > s->cap * SENT_STRIDE)
        start = full - (Py_ssize_t)(s->cap / 2) * SENT_STRIDE;
    PyObject *grown = PyList_New(start < full ? full - SENT_STRIDE : full);
    if (grown == NULL)
        return NULL;
    if (PyList_GET_SIZE(sent) != size) {
        /* (no code resizes a published sent list: never seen) */
        Py_DECREF(grown);
        PyErr_SetString(PyExc_RuntimeError,
                        "the sent states changed size during a send");
        return NULL;
    }
    PyObject *added[SENT_STRIDE] = {now, s->new_num, s->current};
    Py_ssize_t to = 0;
    for (Py_ssize_t i = 0; i < full; i++) {
        if (i >= start && i < start + SENT_STRIDE)
            continue;
        PyObject *item = i < size ? PyList_GET_ITEM(sent, i) : added[i - size];
        PyList_SET_ITEM(grown, to++, Py_NewRef(item));
    }
    slot_set(sender, st->snd.sent, grown);
    Py_DECREF(grown);
    /* _next_ack_time = NEVER or now + interval; _next_send_time = NEVER */
    slot_set(sender, st->snd.next_ack_time, s->next_ack);
    slot_set(sender, st->snd.next_send_time, st->never);
    /* the instruction's chaff: make_chaff(random_bytes) */
    PyObject *random_bytes = get_slot(session, st->s.random_bytes,
                                      "_random_bytes");
    if (random_bytes == NULL)
        return NULL;
    Py_INCREF(random_bytes);
    PyObject *chaff = take_chaff(st, random_bytes);
    Py_DECREF(random_bytes);
    if (chaff == NULL)
        return NULL;
    PyObject *out = NULL, *datagram = NULL, *compressed = NULL;
    Py_ssize_t limit = s->header == Py_None ? st->smallest_payload_plain
        : st->smallest_payload_framed;
    if (PyBytes_CheckExact(chaff) && PyBytes_GET_SIZE(chaff) <= CHAFF_MAX) {
        unsigned char raw[RAW_SIZE];
        Py_ssize_t size = serialize(st, s, PyBytes_AS_STRING(chaff),
                                    PyBytes_GET_SIZE(chaff), raw);
        compressed = deflate_raw(st, raw, size);
        if (compressed == NULL) {
            Py_DECREF(chaff);
            return NULL;
        }
    }
    if (compressed != NULL && PyBytes_CheckExact(compressed)
            && PyBytes_GET_SIZE(compressed) <= limit
            && session_unchanged(st, s, session)) {
        datagram = encode(st, s, session, now, compressed);
        if (datagram != NULL) {
            PyObject *pair = PyTuple_Pack(2, datagram, s->address);
            if (pair != NULL) {
                out = PyList_New(1);
                if (out != NULL)
                    PyList_SET_ITEM(out, 0, pair);
                else
                    Py_DECREF(pair);
            }
        }
    }
    else
        out = send_in_python(st, s, session, now, chaff);
    Py_DECREF(chaff);
    Py_XDECREF(compressed);
    Py_XDECREF(datagram);
    if (out == NULL)
        return NULL;
    /* sender.calculate_timers(now, link.rtt) */
    PyObject *rtt = get_slot(s->link, st->l.rtt, "rtt");
    if (rtt == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_INCREF(rtt);
    Py_INCREF(sender);
    int failed = calculate_timers(st, sender, now, rtt);
    Py_DECREF(sender);
    Py_DECREF(rtt);
    if (failed < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* send(session, now): the list of datagrams, None to hand over, or NULL
 * with an exception (raised where the Python code would raise it). */
PyObject *
send_fast(State *st, PyObject *session, PyObject *now)
{
    if (st->session_type == NULL && bind_session_type(st) < 0)
        return NULL;
    Send s;
    Py_ssize_t assumed = 0;
    memset(&s, 0, sizeof(s));
    if (check_send(st, &s, session, now, &assumed) != GO
            || (s.next_send != NULL && check_diff(st, &s, assumed) != GO)) {
        PyErr_Clear();
        send_clear(&s);
        st->sends_handed_over++;
        Py_RETURN_NONE;
    }
    PyObject *out = change_send(st, &s, session, now);
    send_clear(&s);
    if (out != NULL)
        st->sends_taken++;
    return out;
}
