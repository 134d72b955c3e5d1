/*
 * broker/ssp/_speedups.h: what the files of the compiled receive path
 * share (one extension, broker.ssp._speedups; see _speedups.c for the
 * why and the rule). Internal: nothing here is exported from the module.
 *
 *   _speedups.c           the entry point, _process and the module
 *   _speedups_setup.c     setup(): the objects handed over, slot offsets
 *   _speedups_wire.c      framing, decrypt, DatagramLayer.accept, the
 *                         fragment, inflate and the protobuf parse
 *   _speedups_cbor.c      the diff's CBOR and DeviceState.apply (freeze)
 *   _speedups_receiver.c  Receiver.receive, StateBounds, subtract
 *   _speedups_sender.c    the sender: acks, _rationalize, calculate_timers,
 *                         set_current_state
 *   _speedups_send.c      the send path: SSPSession.datagrams_to_send's
 *                         usual empty ack or new state (send())
 *   _speedups_values.c    device states' values compared and written:
 *                         diff_from's usual diff, with_numbers, a
 *                         report's registry patch, a session record
 *   _speedups_deflate.c   a short instruction deflated as zlib does,
 *                         without zlib's trees (deflate_tiny)
 *   _speedups_deadlines.c DeadlineQueue, broker.scheduler's heap
 *                         (broker/deadlines.py's twin)
 *   _speedups_ocb.c       OCBCipher: AES-128-OCB3 through OpenSSL, keyed
 *                         once (where setup.py finds OpenSSL)
 *   _speedups_slots.h     slot_offset(), which broker/registry/_speedups.c
 *                         uses too
 */

#ifndef BROKER_SSP_SPEEDUPS_H
#define BROKER_SSP_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
/* Times and the RTT are computed in doubles: no fused multiply-add, so
 * each product and sum rounds as Python's do (setup.py passes
 * -ffp-contract=off). */
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__GNUC__)
#define SP_INTERNAL __attribute__((visibility("hidden")))
#else
#define SP_INTERNAL
#endif

#define UINT64_MAX_VALUE UINT64_C(0xFFFFFFFFFFFFFFFF)
#define SEQ_MASK UINT64_C(0x7FFFFFFFFFFFFFFF)
#define NONCE_SIZE 8
#define TIMESTAMP_SIZE 4
#define FRAGMENT_END (TIMESTAMP_SIZE + 10)
/* Sender._sent and Receiver._states: flat lists of (time,) num, state */
#define SENT_STRIDE 3
#define STATES_STRIDE 2

/* ---------------------------------------------------------------------
 * Module state: the objects speedups.py hands over, the slot offsets read
 * from the classes, and two counters.
 * ------------------------------------------------------------------ */

/* The slots used, per class (offsets of their member descriptors). */
typedef struct {
    Py_ssize_t key, ciphers, header, link, sender, receiver, assembly,
        events, flags, ack_waiting, emitted_num, random_bytes, seq_reserved;
} SessionSlots;

typedef struct {
    Py_ssize_t direction_in, expected_seq, saved_timestamp,
        saved_timestamp_at, rtt, remote_address, last_heard, next_seq,
        direction_out;
} LinkSlots;

typedef struct {
    Py_ssize_t srtt_ms, rttvar_ms, hit;
} RTTSlots;

typedef struct {
    Py_ssize_t profile, sent, current, ack_num, last_heard, next_ack_time,
        next_send_time, mindelay_clock, shutdown, backoff, first_num;
} SenderSlots;

typedef struct {
    Py_ssize_t states, held_events;
} ReceiverSlots;

typedef struct {
    Py_ssize_t values, events, event_base;
} StateSlots;

typedef struct {
    Py_ssize_t answer_heartbeats, received_states_cap, state_bounds,
        ack_delay, send_interval_min, send_interval_max, send_mindelay,
        active_retry_timeout, retransmit_backoff, backoff_max, ack_interval,
        sent_states_cap, server_association_timeout;
} ProfileSlots;

typedef struct {
    Py_ssize_t max_diff_bytes, max_events, max_event_bytes, max_values;
} BoundsSlots;

typedef struct {
    Py_ssize_t received_state, received_num, acknowledged_num;
} EventSlots;

typedef struct {
    Py_ssize_t ciphers;
} CipherCacheSlots;
typedef struct {
    Py_ssize_t buffer, position;
} RandomSlots;

typedef struct {
    int ready;
    /* classes (exact types are required; their slots are used by offset) */
    PyObject *session_class_getter;   /* called once: SSPSession */
    PyTypeObject *session_type;
    PyTypeObject *link_type, *rtt_type, *sender_type, *receiver_type,
        *state_type, *profile_type, *bounds_type, *received_type,
        *acknowledged_type, *cipher_cache_type, *ordered_dict_type,
        *buffered_random_type;
    /* exceptions, functions and shared objects */
    PyObject *invalid_tag, *decompress, *datagram_rejected, *auth_failed,
        *no_values, *empty_map, *never;
    /* the send path's: make_chaff, instruction.deflate, Instruction */
    PyObject *make_chaff, *deflate, *instruction_class;
    /* interned method and attribute names */
    PyObject *str_get, *str_decrypt, *str_emit, *str_rationalize,
        *str_subtract, *str_calculate_timers, *str_rtt, *str_front_num,
        *str_move_to_end, *str_encrypt, *str_send_instruction, *str_join,
        *str_encode, *str_diff_from, *str_set_current_state;
    /* constants */
    Py_ssize_t header_size, overhead, inflate_at_once, max_acks_waiting;
    long no_timestamp, final_bit, protocol_version, max_depth,
        array_head_growth;
    long closed, server, hold_acks, acks_overflowed, asks_acks,
        seq_requested;
    /* the send path: SEQ_RESERVATION_BLOCK, SMALL_INSTRUCTION, the
     * smallest fragment payload without and with the header, ECHO_WINDOW
     * in ms */
    long long seq_reservation_block;
    Py_ssize_t small_instruction, smallest_payload_plain,
        smallest_payload_framed;
    double echo_window_ms;
    /* Sender.tick's prospective resend: PROSPECTIVE_RESEND_SLACK and
     * PROSPECTIVE_RESEND_LIMIT (bytes of diff) */
    Py_ssize_t prospective_resend_slack, prospective_resend_limit;
    double alpha, beta, max_sample_ms, min_rto, max_rto;
    SessionSlots s;
    LinkSlots l;
    RTTSlots r;
    SenderSlots snd;
    ReceiverSlots rcv;
    StateSlots ds;
    ProfileSlots p;
    BoundsSlots b;
    EventSlots e;
    CipherCacheSlots cc;
    RandomSlots br;
    /* datagrams taken whole and handed over since import */
    unsigned long long taken, handed_over;
    /* datagrams_to_send calls taken whole and handed over */
    unsigned long long sends_taken, sends_handed_over;
    /* the send path's deflate stream (a z_stream when zlib is linked),
     * made once and reset per instruction: setting one up costs more
     * than compressing an ack (freed with the module) */
    void *deflater;
} State;

/* ---------------------------------------------------------------------
 * Slots by offset. A class's __slots__ are member descriptors; after an
 * exact type check, reading one is a load (NULL: never set, which Python
 * would report as AttributeError: hand over) and writing one a store.
 * ------------------------------------------------------------------ */

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* obj.<slot> = value (a new reference is taken; the old one dropped). */
static inline void
slot_set(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject *old = SLOT(obj, offset);
    Py_INCREF(value);
    SLOT(obj, offset) = value;
    Py_XDECREF(old);
}

/* obj's slot, or AttributeError if it was never set (borrowed). */
static inline PyObject *
get_slot(PyObject *obj, Py_ssize_t offset, const char *name)
{
    PyObject *value = SLOT(obj, offset);
    if (value == NULL)
        PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute "
                     "'%s'", Py_TYPE(obj)->tp_name, name);
    return value;
}

/* An exact int as uint64: 0 on success, -1 (no exception) if it is not
 * one or does not fit. */
static inline int
as_u64(PyObject *obj, uint64_t *out)
{
    if (obj == NULL || !PyLong_CheckExact(obj))
        return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = value;
    return 0;
}

/* An exact int or float as a double, as Python converts it for float
 * arithmetic: 0 on success, -1 (no exception) otherwise. */
static inline int
as_double(PyObject *obj, double *out)
{
    if (obj == NULL)
        return -1;
    if (PyFloat_CheckExact(obj)) {
        *out = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    if (PyLong_CheckExact(obj)) {
        double value = PyLong_AsDouble(obj);
        if (value == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        *out = value;
        return 0;
    }
    return -1;
}

/* A millisecond figure of the RTT (_srtt_ms, _rttvar_ms) as a double
 * when Python's arithmetic on it (srtt + 4 * rttvar, srtt - r with an int
 * sample r) gives what the double gives: an exact float, or an exact int
 * of at most 2**40 (a larger int would be rounded before the sum or the
 * difference, where Python rounds once after it). */
static inline int
ms_of(PyObject *obj, double *out)
{
    if (obj != NULL && PyFloat_CheckExact(obj)) {
        *out = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    if (as_double(obj, out) < 0 || !(fabs(*out) <= 1099511627776.0))
        return -1;
    return 0;
}

/* An exact float's value (profile constants: an int there would make
 * Python's results ints; the caller then lets Python compute). */
static inline int
as_float(PyObject *obj, double *out)
{
    if (obj == NULL || !PyFloat_CheckExact(obj))
        return -1;
    *out = PyFloat_AS_DOUBLE(obj);
    return 0;
}

static inline uint64_t
read_be64(const unsigned char *p)
{
    uint64_t value = 0;
    for (int i = 0; i < 8; i++)
        value = (value << 8) | p[i];
    return value;
}

static inline unsigned int
read_be16(const unsigned char *p)
{
    return ((unsigned int)p[0] << 8) | p[1];
}

/* ---------------------------------------------------------------------
 * The work on one datagram: what the checks found and the objects they
 * built (all owned, released by work_clear), for the changes to use.
 * ------------------------------------------------------------------ */

/* The inflated instructions C holds in its own buffer (the usual one is
 * about a hundred bytes); a longer one goes through zlib.decompress. */
#define WORK_INFLATED_SIZE 2048

typedef struct {
    uint64_t old_num, new_num, ack_num, throwaway_num;
    const unsigned char *diff;
    Py_ssize_t diff_len;
} Instruction;

typedef struct {
    /* the session and its parts */
    PyObject *link, *rtt, *sender, *receiver, *profile, *states, *reference;
    PyObject *bounds;          /* profile.state_bounds, held */
    long flags;
    double now;                /* `now` as a double */
    uint64_t nonce_value;
    PyObject *plaintext;
    PyObject *raw;             /* the inflated instruction */
    /* DatagramLayer.accept */
    PyObject *next_expected;   /* seq + 1 */
    PyObject *timestamp;       /* NULL: NO_TIMESTAMP, nothing saved */
    PyObject *now_ms;
    int rtt_sample;            /* add_sample_ms takes a sample */
    PyObject *srtt, *rttvar;   /* their new values */
    /* the instruction */
    Instruction inst;
    PyObject *num;             /* new_num */
    /* Sender.process_acknowledgment_through */
    Py_ssize_t acked_from;     /* the front moves: _sent[acked_from:] */
    /* Receiver.receive */
    Py_ssize_t keep_from;
    int evict;
    PyObject *new_state;       /* reference itself when nothing changed */
    int unchanged;             /* new_state is the newest held */
    int set_held;              /* bounds.check ran: _held_events = held */
    PyObject *held;
    /* _process */
    int acknowledge;           /* sender.ack_num = num */
    PyObject *ack_due;         /* set_data_ack: the new _next_ack_time */
    int hold;                  /* held ack: recorded, or the list is full */
    PyObject *new_waiting;     /* the first held ack: a new list */
    /* the inflated instruction when zlib is linked (else `raw`): last, so
     * that clearing the work need not clear it */
    unsigned char inflated[WORK_INFLATED_SIZE];
} Work;

/* What a check says: go on, or hand the datagram over (an exception
 * raised while checking is cleared: Python meets it again). */
#define GO 0
#define HAND_OVER 1

/* _speedups_wire.c */
SP_INTERNAL int check_framing(State *st, Work *w, PyObject *session,
                              PyObject *data, PyObject *now,
                              Py_ssize_t *offset);
SP_INTERNAL int decrypt(const State *st, Work *w, PyObject *session,
                        PyObject *data, Py_ssize_t offset);
SP_INTERNAL PyObject *cipher_for(const State *st, PyObject *ciphers,
                                  PyObject *key);
SP_INTERNAL int check_accept(const State *st, Work *w, PyObject *address);
SP_INTERNAL int check_instruction(const State *st, Work *w);

/* _speedups_cbor.c */
SP_INTERNAL int apply_diff(const State *st, Work *w);
SP_INTERNAL PyObject *make_state(const State *st, PyObject *values,
                                 PyObject *events, PyObject *base);

/* _speedups_values.c */
SP_INTERNAL PyObject *diff_values(const State *st, PyObject *current,
                                  PyObject *base);
SP_INTERNAL PyObject *with_numbers(const State *st, PyObject *state,
                                   PyObject *patch);
SP_INTERNAL PyObject *values_patch(const State *st, PyObject *old,
                                   PyObject *new);
SP_INTERNAL PyObject *state_record(const State *st, PyObject *state);
/* _speedups_receiver.c */
SP_INTERNAL int check_receive(const State *st, Work *w);
SP_INTERNAL PyObject *subtract(const State *st, PyObject *self,
                               PyObject *prefix);
SP_INTERNAL PyObject *change_receiver(const State *st, Work *w);

/* _speedups_sender.c: the profile's timings as doubles (timing_of) */
typedef struct {
    double send_interval_min, send_interval_max, send_mindelay,
        active_retry_timeout, ack_delay, backoff_max;
    int retransmit_backoff;
} Timing;

SP_INTERNAL int check_ack(const State *st, Work *w);
SP_INTERNAL int states_equal(const State *st, PyObject *a, PyObject *b);
SP_INTERNAL PyObject *session_wakeup(State *st, PyObject *session);
SP_INTERNAL PyObject *set_state(const State *st, PyObject *sender,
                                PyObject *state, PyObject *now);
SP_INTERNAL int change_sender(const State *st, Work *w, PyObject *session);
SP_INTERNAL int fast_timers(const State *st, PyObject *sender,
                            PyObject *now, PyObject *rtt);
SP_INTERNAL int calculate_timers(const State *st, PyObject *sender,
                                 PyObject *now, PyObject *rtt);
SP_INTERNAL int time_of(PyObject *obj, double *out);
SP_INTERNAL int timing_of(const State *st, PyObject *profile, Timing *t);
SP_INTERNAL int send_interval(const State *st, const Timing *t,
                              PyObject *rtt, double *out);
SP_INTERNAL int retransmit_timeout(const State *st, const Timing *t,
                                   PyObject *sender, PyObject *rtt,
                                   double *out);
SP_INTERNAL Py_ssize_t assumed_index(const Timing *t, PyObject *sent,
                                     double now, double rto);

/* _speedups_send.c */
SP_INTERNAL PyObject *send_fast(State *st, PyObject *session, PyObject *now);
SP_INTERNAL void send_free(State *st);
SP_INTERNAL PyObject *deflate_short(State *st, const unsigned char *raw,
                                    Py_ssize_t size);

/* _speedups_setup.c */
SP_INTERNAL PyObject *setup_state(State *st, PyObject *args,
                                  PyObject *kwargs);
SP_INTERNAL void state_clear_objects(State *st);
SP_INTERNAL int bind_session_type(State *st);

/* _speedups_deflate.c */
SP_INTERNAL PyObject *deflate_tiny(const unsigned char *raw, Py_ssize_t size);

/* _speedups_deadlines.c */
extern SP_INTERNAL PyTypeObject DeadlineQueueType;

/* _speedups_ocb.c: seal writes size + 16 bytes to out; open reads size
 * bytes (the tag last) and writes size - 16, answering 0, 1 for a tag
 * that does not match (or too short), -1 with an exception. */
SP_INTERNAL int is_ocb_cipher(PyObject *obj);
SP_INTERNAL int ocb_seal(PyObject *cipher, const unsigned char *nonce,
                         const unsigned char *aad, Py_ssize_t aad_size,
                         const unsigned char *in, Py_ssize_t size,
                         unsigned char *out);
SP_INTERNAL int ocb_open(PyObject *cipher, const unsigned char *nonce,
                         const unsigned char *aad, Py_ssize_t aad_size,
                         const unsigned char *in, Py_ssize_t size,
                         unsigned char *out);
SP_INTERNAL int add_ocb_cipher(PyObject *module);
#ifdef SP_HAVE_OPENSSL
extern SP_INTERNAL PyTypeObject OCBCipherType;
#endif

/* _speedups.c */
SP_INTERNAL PyObject *new_event(PyTypeObject *cls, Py_ssize_t first,
                                PyObject *first_value, Py_ssize_t second,
                                PyObject *second_value);
SP_INTERNAL int emit(const State *st, PyObject *session, PyObject *event);

#endif
