/*
 * broker/ssp/_speedups_setup.c: what broker/ssp/speedups.py hands over,
 * once (setup()), and the slots' offsets read from the classes it gives.
 */

#include "_speedups.h"
#include "_speedups_slots.h"

/* ---------------------------------------------------------------------
 * The slots' offsets, read once from the classes.
 * ------------------------------------------------------------------ */

#define OFFSET(cls, name, field) \
    if (slot_offset((cls), (name), &(field)) < 0) return -1

static int
session_offsets(State *st, PyTypeObject *cls)
{
    OFFSET(cls, "_key", st->s.key);
    OFFSET(cls, "_ciphers", st->s.ciphers);
    OFFSET(cls, "_header", st->s.header);
    OFFSET(cls, "_link", st->s.link);
    OFFSET(cls, "_sender", st->s.sender);
    OFFSET(cls, "_receiver", st->s.receiver);
    OFFSET(cls, "_assembly", st->s.assembly);
    OFFSET(cls, "_events", st->s.events);
    OFFSET(cls, "_flags", st->s.flags);
    OFFSET(cls, "_ack_waiting", st->s.ack_waiting);
    OFFSET(cls, "_emitted_num", st->s.emitted_num);
    OFFSET(cls, "_random_bytes", st->s.random_bytes);
    OFFSET(cls, "_seq_reserved", st->s.seq_reserved);
    return 0;
}

static int
other_offsets(State *st)
{
    OFFSET(st->link_type, "direction_in", st->l.direction_in);
    OFFSET(st->link_type, "expected_seq", st->l.expected_seq);
    OFFSET(st->link_type, "saved_timestamp", st->l.saved_timestamp);
    OFFSET(st->link_type, "saved_timestamp_at", st->l.saved_timestamp_at);
    OFFSET(st->link_type, "rtt", st->l.rtt);
    OFFSET(st->link_type, "remote_address", st->l.remote_address);
    OFFSET(st->link_type, "last_heard", st->l.last_heard);
    OFFSET(st->link_type, "next_seq", st->l.next_seq);
    OFFSET(st->link_type, "direction_out", st->l.direction_out);
    OFFSET(st->rtt_type, "_srtt_ms", st->r.srtt_ms);
    OFFSET(st->rtt_type, "_rttvar_ms", st->r.rttvar_ms);
    OFFSET(st->rtt_type, "hit", st->r.hit);
    OFFSET(st->sender_type, "_profile", st->snd.profile);
    OFFSET(st->sender_type, "_sent", st->snd.sent);
    OFFSET(st->sender_type, "ack_num", st->snd.ack_num);
    OFFSET(st->sender_type, "last_heard", st->snd.last_heard);
    OFFSET(st->sender_type, "_next_ack_time", st->snd.next_ack_time);
    OFFSET(st->sender_type, "_backoff", st->snd.backoff);
    OFFSET(st->sender_type, "current", st->snd.current);
    OFFSET(st->sender_type, "_next_send_time", st->snd.next_send_time);
    OFFSET(st->sender_type, "_mindelay_clock", st->snd.mindelay_clock);
    OFFSET(st->sender_type, "_shutdown", st->snd.shutdown);
    OFFSET(st->sender_type, "_first_num", st->snd.first_num);
    OFFSET(st->receiver_type, "_states", st->rcv.states);
    OFFSET(st->receiver_type, "_held_events", st->rcv.held_events);
    OFFSET(st->state_type, "_values", st->ds.values);
    OFFSET(st->state_type, "_events", st->ds.events);
    OFFSET(st->state_type, "_event_base", st->ds.event_base);
    OFFSET(st->profile_type, "answer_heartbeats", st->p.answer_heartbeats);
    OFFSET(st->profile_type, "received_states_cap",
           st->p.received_states_cap);
    OFFSET(st->profile_type, "state_bounds", st->p.state_bounds);
    OFFSET(st->profile_type, "ack_delay", st->p.ack_delay);
    OFFSET(st->profile_type, "send_interval_min", st->p.send_interval_min);
    OFFSET(st->profile_type, "send_interval_max", st->p.send_interval_max);
    OFFSET(st->profile_type, "send_mindelay", st->p.send_mindelay);
    OFFSET(st->profile_type, "active_retry_timeout",
           st->p.active_retry_timeout);
    OFFSET(st->profile_type, "retransmit_backoff",
           st->p.retransmit_backoff);
    OFFSET(st->profile_type, "backoff_max", st->p.backoff_max);
    OFFSET(st->profile_type, "ack_interval", st->p.ack_interval);
    OFFSET(st->profile_type, "sent_states_cap", st->p.sent_states_cap);
    OFFSET(st->profile_type, "server_association_timeout",
           st->p.server_association_timeout);
    OFFSET(st->bounds_type, "max_diff_bytes", st->b.max_diff_bytes);
    OFFSET(st->bounds_type, "max_values", st->b.max_values);
    OFFSET(st->bounds_type, "max_events", st->b.max_events);
    OFFSET(st->bounds_type, "max_event_bytes", st->b.max_event_bytes);
    OFFSET(st->cipher_cache_type, "_ciphers", st->cc.ciphers);
    OFFSET(st->buffered_random_type, "_buffer", st->br.buffer);
    OFFSET(st->buffered_random_type, "_position", st->br.position);
    OFFSET(st->received_type, "state", st->e.received_state);
    OFFSET(st->received_type, "num", st->e.received_num);
    OFFSET(st->acknowledged_type, "num", st->e.acknowledged_num);
    return 0;
}

/* The session class, asked for once (speedups.py cannot import it when
 * it gives the others: the session module imports it). */
int
bind_session_type(State *st)
{
    PyObject *cls = PyObject_CallNoArgs(st->session_class_getter);
    if (cls == NULL)
        return -1;
    if (!PyType_Check(cls)) {
        Py_DECREF(cls);
        PyErr_SetString(PyExc_TypeError, "session_class() gave no class");
        return -1;
    }
    if (session_offsets(st, (PyTypeObject *)cls) < 0) {
        Py_DECREF(cls);
        return -1;
    }
    st->session_type = (PyTypeObject *)cls;  /* the reference is kept */
    return 0;
}

/* receive_datagram's answer to an InvalidTag: the DatagramRejected event
 * (AUTH_FAILED) through self._emit, then the timers. */
/* ---------------------------------------------------------------------
 * setup(**objects): what speedups.py hands over, once.
 * ------------------------------------------------------------------ */

void
state_clear_objects(State *st)
{
    st->ready = 0;
    Py_CLEAR(st->session_class_getter);
    Py_CLEAR(st->session_type);
    Py_CLEAR(st->link_type);
    Py_CLEAR(st->rtt_type);
    Py_CLEAR(st->sender_type);
    Py_CLEAR(st->receiver_type);
    Py_CLEAR(st->state_type);
    Py_CLEAR(st->profile_type);
    Py_CLEAR(st->bounds_type);
    Py_CLEAR(st->received_type);
    Py_CLEAR(st->acknowledged_type);
    Py_CLEAR(st->cipher_cache_type);
    Py_CLEAR(st->ordered_dict_type);
    Py_CLEAR(st->buffered_random_type);
    Py_CLEAR(st->invalid_tag);
    Py_CLEAR(st->decompress);
    Py_CLEAR(st->datagram_rejected);
    Py_CLEAR(st->auth_failed);
    Py_CLEAR(st->no_values);
    Py_CLEAR(st->empty_map);
    Py_CLEAR(st->never);
    Py_CLEAR(st->make_chaff);
    Py_CLEAR(st->deflate);
    Py_CLEAR(st->instruction_class);
}

/* kwargs[name] as a new reference, or TypeError. */
static PyObject *
given(PyObject *kwargs, const char *name)
{
    PyObject *value = kwargs ? PyDict_GetItemString(kwargs, name) : NULL;
    if (value == NULL) {
        PyErr_Format(PyExc_TypeError, "setup() needs %s", name);
        return NULL;
    }
    return Py_NewRef(value);
}

static int
given_type(PyObject *kwargs, const char *name, PyTypeObject **out)
{
    PyObject *value = given(kwargs, name);
    if (value == NULL)
        return -1;
    if (!PyType_Check(value)) {
        Py_DECREF(value);
        PyErr_Format(PyExc_TypeError, "setup(): %s is not a class", name);
        return -1;
    }
    *out = (PyTypeObject *)value;
    return 0;
}

static int
given_long(PyObject *kwargs, const char *name, long *out)
{
    PyObject *value = given(kwargs, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
given_double(PyObject *kwargs, const char *name, double *out)
{
    PyObject *value = given(kwargs, name);
    if (value == NULL)
        return -1;
    *out = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

#define GIVEN(name) \
    if ((st->name = given(kwargs, #name)) == NULL) goto error
#define GIVEN_TYPE(name) \
    if (given_type(kwargs, #name, &st->name) < 0) goto error
#define GIVEN_LONG(name, field) \
    if (given_long(kwargs, name, &(field)) < 0) goto error
#define GIVEN_DOUBLE(name, field) \
    if (given_double(kwargs, name, &(field)) < 0) goto error

/* setup(**objects) (see _speedups.c): None, or NULL and an exception
 * (then nothing is kept, and receive() refuses to run). */
PyObject *
setup_state(State *st, PyObject *args, PyObject *kwargs)
{
    long value;
    if (PyTuple_GET_SIZE(args)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes keywords only");
        return NULL;
    }
    state_clear_objects(st);
    if ((st->session_class_getter = given(kwargs, "session_class")) == NULL)
        goto error;
    if (given_type(kwargs, "link_class", &st->link_type) < 0
            || given_type(kwargs, "rtt_class", &st->rtt_type) < 0
            || given_type(kwargs, "sender_class", &st->sender_type) < 0
            || given_type(kwargs, "receiver_class", &st->receiver_type) < 0
            || given_type(kwargs, "state_class", &st->state_type) < 0
            || given_type(kwargs, "profile_class", &st->profile_type) < 0
            || given_type(kwargs, "bounds_class", &st->bounds_type) < 0
            || given_type(kwargs, "state_received_class",
                          &st->received_type) < 0
            || given_type(kwargs, "state_acknowledged_class",
                          &st->acknowledged_type) < 0
            || given_type(kwargs, "cipher_cache_class",
                          &st->cipher_cache_type) < 0
            || given_type(kwargs, "ordered_dict_class",
                          &st->ordered_dict_type) < 0
            || given_type(kwargs, "buffered_random_class",
                          &st->buffered_random_type) < 0)
        goto error;
    GIVEN(invalid_tag);
    GIVEN(decompress);
    GIVEN(datagram_rejected);
    GIVEN(auth_failed);
    GIVEN(no_values);
    GIVEN(empty_map);
    GIVEN(never);
    GIVEN(make_chaff);
    GIVEN(deflate);
    GIVEN(instruction_class);
    GIVEN_LONG("header_size", value);
    st->header_size = value;
    GIVEN_LONG("overhead", value);
    st->overhead = value;
    GIVEN_LONG("inflate_at_once", value);
    st->inflate_at_once = value;
    GIVEN_LONG("max_acks_waiting", value);
    st->max_acks_waiting = value;
    GIVEN_LONG("no_timestamp", st->no_timestamp);
    GIVEN_LONG("final_bit", st->final_bit);
    GIVEN_LONG("protocol_version", st->protocol_version);
    GIVEN_LONG("max_depth", st->max_depth);
    GIVEN_LONG("array_head_growth", st->array_head_growth);
    GIVEN_LONG("closed", st->closed);
    GIVEN_LONG("server", st->server);
    GIVEN_LONG("hold_acks", st->hold_acks);
    GIVEN_LONG("acks_overflowed", st->acks_overflowed);
    GIVEN_LONG("asks_acks", st->asks_acks);
    GIVEN_LONG("seq_requested", st->seq_requested);
    GIVEN_LONG("seq_reservation_block", value);
    st->seq_reservation_block = value;
    GIVEN_LONG("small_instruction", value);
    st->small_instruction = value;
    GIVEN_LONG("smallest_payload_plain", value);
    st->smallest_payload_plain = value;
    GIVEN_LONG("smallest_payload_framed", value);
    st->smallest_payload_framed = value;
    GIVEN_LONG("prospective_resend_slack", value);
    st->prospective_resend_slack = value;
    GIVEN_LONG("prospective_resend_limit", value);
    st->prospective_resend_limit = value;
    GIVEN_DOUBLE("echo_window_ms", st->echo_window_ms);
    GIVEN_DOUBLE("alpha", st->alpha);
    GIVEN_DOUBLE("beta", st->beta);
    GIVEN_DOUBLE("max_sample_ms", st->max_sample_ms);
    GIVEN_DOUBLE("min_rto", st->min_rto);
    GIVEN_DOUBLE("max_rto", st->max_rto);
    if (other_offsets(st) < 0)
        goto error;
    st->ready = 1;
    Py_RETURN_NONE;
error:
    state_clear_objects(st);
    return NULL;
}

