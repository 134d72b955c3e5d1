/*
 * broker/ssp/_speedups_deadlines.c: DeadlineQueue, the compiled twin of
 * broker/deadlines.py (the reference: read it first). broker.scheduler
 * keeps every session's wake-up in one; the Python heap of (when,
 * counter, key) tuples compares tuples, and its bookkeeping is a few
 * dict operations in Python per wake-up: here the heap holds C structs
 * compared as two numbers, and the same dicts are used from C.
 *
 * The same entries in the same order, the same dict contents, the same
 * answers (tests/test_deadlines.py runs both under random operations).
 * Times are held as doubles (a time is a float or an int: an int beyond
 * 2**53 would round; the scheduler's times are monotonic seconds). Keys'
 * __hash__ and __eq__ may run Python code: nothing here holds a pointer
 * into the heap across a dict operation.
 */

#include "_speedups.h"

typedef struct {
    double when;
    unsigned long long counter;
    PyObject *key;   /* strong */
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *heap;
    Py_ssize_t size, capacity;
    PyObject *due;      /* key -> float: the time each key wants */
    PyObject *queued;   /* key -> float: the time of its live heap entry */
    unsigned long long counter;
    Py_ssize_t min_compact;
} Queue;

static int
earlier(const Entry *a, const Entry *b)
{
    return a->when < b->when || (a->when == b->when && a->counter < b->counter);
}

static void
sift_up(Entry *heap, Py_ssize_t pos)
{
    Entry item = heap[pos];
    while (pos > 0) {
        Py_ssize_t parent = (pos - 1) >> 1;
        if (!earlier(&item, &heap[parent]))
            break;
        heap[pos] = heap[parent];
        pos = parent;
    }
    heap[pos] = item;
}

static void
sift_down(Entry *heap, Py_ssize_t size, Py_ssize_t pos)
{
    Entry item = heap[pos];
    for (;;) {
        Py_ssize_t child = 2 * pos + 1;
        if (child >= size)
            break;
        if (child + 1 < size && earlier(&heap[child + 1], &heap[child]))
            child++;
        if (!earlier(&heap[child], &item))
            break;
        heap[pos] = heap[child];
        pos = child;
    }
    heap[pos] = item;
}

/* Remove the top entry; its key reference passes to the caller. */
static Entry
pop_top(Queue *q)
{
    Entry top = q->heap[0];
    q->size--;
    if (q->size > 0) {
        q->heap[0] = q->heap[q->size];
        sift_down(q->heap, q->size, 0);
    }
    return top;
}

static int
reserve(Queue *q, Py_ssize_t wanted)
{
    if (wanted <= q->capacity)
        return 0;
    Py_ssize_t capacity = q->capacity ? q->capacity : 16;
    while (capacity < wanted)
        capacity *= 2;
    Entry *grown = PyMem_Realloc(q->heap, (size_t)capacity * sizeof(Entry));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    q->heap = grown;
    q->capacity = capacity;
    return 0;
}

/* A number as a double; NULL-free: -1 with an exception. */
static int
time_value(PyObject *obj, double *out)
{
    if (PyFloat_CheckExact(obj)) {
        *out = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred())
        return -1;
    *out = value;
    return 0;
}

/* The float stored for a time: the given object when it is one (the
 * reference stores what it is given; an int is stored as its float). */
static PyObject *
time_object(PyObject *obj, double value)
{
    if (PyFloat_CheckExact(obj))
        return Py_NewRef(obj);
    return PyFloat_FromDouble(value);
}

static int compact(Queue *q);
static int pop_key(PyObject *dict, PyObject *key);

/* _push: queued[key] = when; a new heap entry; compact if stale entries
 * outnumber live ones. */
static int
push(Queue *q, PyObject *key, double when, PyObject *when_obj)
{
    /* Room first: a key queued without its entry would never fire. */
    if (reserve(q, q->size + 1) < 0
            || PyDict_SetItem(q->queued, key, when_obj) < 0)
        return -1;
    q->counter++;
    Entry *slot = &q->heap[q->size];
    slot->when = when;
    slot->counter = q->counter;
    slot->key = Py_NewRef(key);
    q->size++;
    sift_up(q->heap, q->size - 1);
    if (q->size > q->min_compact && q->size > 2 * PyDict_GET_SIZE(q->queued))
        return compact(q);
    return 0;
}

/* _compact: drop queued keys no longer due, then one entry per queued key,
 * numbered in the dict's order after every number given so far. */
static int
compact(Queue *q)
{
    /* The keys first (a key's __eq__ may run code: no dict is walked
     * while another is asked). */
    PyObject *keys = PyDict_Keys(q->queued);
    if (keys == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        int due = PyDict_Contains(q->due, key);
        if (due < 0 || (due == 0 && pop_key(q->queued, key) < 0)) {
            Py_DECREF(keys);
            return -1;
        }
    }
    Py_DECREF(keys);
    /* The live entries first (new references), then the old heap goes. */
    Py_ssize_t live = PyDict_GET_SIZE(q->queued);
    Entry *fresh = PyMem_Malloc((size_t)(live ? live : 1) * sizeof(Entry));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t n = 0, pos = 0;
    PyObject *key, *value;
    while (n < live && PyDict_Next(q->queued, &pos, &key, &value)) {
        fresh[n].when = PyFloat_AsDouble(value);
        fresh[n].counter = q->counter + (unsigned long long)n + 1;
        fresh[n].key = Py_NewRef(key);
        n++;
    }
    q->counter += (unsigned long long)n;
    Entry *old = q->heap;
    Py_ssize_t old_size = q->size;
    q->heap = fresh;
    q->size = n;
    q->capacity = live ? live : 1;
    for (Py_ssize_t i = n / 2 - 1; i >= 0; i--)
        sift_down(q->heap, q->size, i);
    for (Py_ssize_t i = 0; i < old_size; i++)
        Py_DECREF(old[i].key);
    PyMem_Free(old);
    return 0;
}

static PyObject *
queue_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"min_compact", NULL};
    Py_ssize_t min_compact = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n:DeadlineQueue", names,
                                     &min_compact))
        return NULL;
    Queue *q = (Queue *)type->tp_alloc(type, 0);
    if (q == NULL)
        return NULL;
    q->min_compact = min_compact;
    q->due = PyDict_New();
    q->queued = PyDict_New();
    if (q->due == NULL || q->queued == NULL) {
        Py_DECREF(q);
        return NULL;
    }
    return (PyObject *)q;
}

static int
queue_traverse(Queue *q, visitproc visit, void *arg)
{
    Py_VISIT(q->due);
    Py_VISIT(q->queued);
    for (Py_ssize_t i = 0; i < q->size; i++)
        Py_VISIT(q->heap[i].key);
    return 0;
}

static int
queue_clear(Queue *q)
{
    Entry *heap = q->heap;
    Py_ssize_t size = q->size;
    q->heap = NULL;
    q->size = q->capacity = 0;
    for (Py_ssize_t i = 0; i < size; i++)
        Py_DECREF(heap[i].key);
    PyMem_Free(heap);
    Py_CLEAR(q->due);
    Py_CLEAR(q->queued);
    return 0;
}

static void
queue_dealloc(Queue *q)
{
    PyObject_GC_UnTrack(q);
    queue_clear(q);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static Py_ssize_t
queue_len(Queue *q)
{
    return q->due ? PyDict_GET_SIZE(q->due) : 0;
}

static int
queue_contains(Queue *q, PyObject *key)
{
    return q->due ? PyDict_Contains(q->due, key) : 0;
}

static int
ready(Queue *q)
{
    if (q->due == NULL) {
        PyErr_SetString(PyExc_ValueError, "the DeadlineQueue was cleared");
        return -1;
    }
    return 0;
}

static PyObject *
queue_schedule(Queue *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "schedule() takes 2 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *key = args[0];
    double when;
    if (ready(q) < 0)
        return NULL;
    if (key == Py_None) {
        PyErr_SetString(PyExc_TypeError, "a wake-up's key cannot be None");
        return NULL;
    }
    if (time_value(args[1], &when) < 0)
        return NULL;
    PyObject *when_obj = time_object(args[1], when);
    if (when_obj == NULL)
        return NULL;
    if (PyDict_SetItem(q->due, key, when_obj) < 0)
        goto error;
    PyObject *queued = PyDict_GetItemWithError(q->queued, key);
    if (queued == NULL && PyErr_Occurred())
        goto error;
    if (queued != NULL && PyFloat_AsDouble(queued) <= when) {
        Py_DECREF(when_obj);
        Py_RETURN_FALSE;
    }
    if (push(q, key, when, when_obj) < 0)
        goto error;
    Py_DECREF(when_obj);
    Py_RETURN_TRUE;
error:
    Py_DECREF(when_obj);
    return NULL;
}

/* dict.pop(key, None) is not None, as 1/0, or -1 with an exception. */
static int
pop_key(PyObject *dict, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    if (value == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyDict_DelItem(dict, key) < 0 ? -1 : 1;
}

static PyObject *
queue_cancel(Queue *q, PyObject *key)
{
    if (ready(q) < 0 || pop_key(q->due, key) < 0)
        return NULL;
    int was_queued = pop_key(q->queued, key);
    if (was_queued < 0)
        return NULL;
    if (was_queued && q->size > q->min_compact
            && q->size > 2 * PyDict_GET_SIZE(q->queued) && compact(q) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
queue_when(Queue *q, PyObject *key)
{
    if (ready(q) < 0)
        return NULL;
    PyObject *when = PyDict_GetItemWithError(q->due, key);
    if (when == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_NewRef(when);
}

static PyObject *
queue_keys(Queue *q, PyObject *unused)
{
    if (ready(q) < 0)
        return NULL;
    return PyDict_Keys(q->due);
}

static PyObject *
queue_heap_size(Queue *q, PyObject *unused)
{
    return PyLong_FromSsize_t(q->size);
}

/* queued.get(key) == when: 1, 0, or -1 with an exception. */
static int
is_live(Queue *q, PyObject *key, double when)
{
    PyObject *queued = PyDict_GetItemWithError(q->queued, key);
    if (queued == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyFloat_AsDouble(queued) == when;
}

static PyObject *
queue_earliest(Queue *q, PyObject *unused)
{
    if (ready(q) < 0)
        return NULL;
    while (q->size > 0) {
        PyObject *key = Py_NewRef(q->heap[0].key);
        double when = q->heap[0].when;
        int live = is_live(q, key, when);
        if (live > 0) {
            int due = PyDict_Contains(q->due, key);
            if (due > 0) {
                Py_DECREF(key);
                return PyFloat_FromDouble(when);
            }
            if (due < 0 || PyDict_DelItem(q->queued, key) < 0)
                live = -1;   /* cancelled: del queued[key] */
        }
        if (live < 0) {
            Py_DECREF(key);
            return NULL;
        }
        /* The top may have changed meanwhile (a key's __eq__): pop only the
         * entry looked at, as the reference's heappop would. */
        if (q->size > 0 && q->heap[0].key == key && q->heap[0].when == when) {
            Entry top = pop_top(q);
            Py_DECREF(top.key);
        }
        Py_DECREF(key);
    }
    Py_RETURN_NONE;
}

static PyObject *
queue_pop_due(Queue *q, PyObject *const *args, Py_ssize_t nargs)
{
    double limit;
    unsigned long long newest;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "pop_due() takes 2 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (ready(q) < 0 || time_value(args[0], &limit) < 0)
        return NULL;
    newest = PyLong_AsUnsignedLongLong(args[1]);
    if (newest == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    while (q->size > 0 && q->heap[0].when <= limit && q->heap[0].counter <= newest) {
        Entry top = pop_top(q);
        PyObject *key = top.key;   /* the heap's reference, now ours */
        int live = is_live(q, key, top.when);
        if (live <= 0) {
            Py_DECREF(key);
            if (live < 0)
                return NULL;
            continue;   /* superseded by an earlier entry */
        }
        if (PyDict_DelItem(q->queued, key) < 0)
            goto error;
        PyObject *wanted = PyDict_GetItemWithError(q->due, key);
        if (wanted == NULL) {
            if (PyErr_Occurred())
                goto error;
            Py_DECREF(key);
            continue;   /* cancelled */
        }
        double wanted_time = PyFloat_AsDouble(wanted);
        if (wanted_time > limit) {
            /* postponed meanwhile: put back at its wanted time */
            Py_INCREF(wanted);
            int failed = push(q, key, wanted_time, wanted);
            Py_DECREF(wanted);
            if (failed < 0)
                goto error;
            Py_DECREF(key);
            continue;
        }
        if (PyDict_DelItem(q->due, key) < 0)
            goto error;
        return key;
    error:
        Py_DECREF(key);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
queue_get_counter(Queue *q, void *closure)
{
    return PyLong_FromUnsignedLongLong(q->counter);
}

static PyMethodDef queue_methods[] = {
    {"schedule", (PyCFunction)(void (*)(void))queue_schedule, METH_FASTCALL,
     "schedule(key, when) -> bool: as broker.deadlines.DeadlineQueue's."},
    {"cancel", (PyCFunction)queue_cancel, METH_O, "cancel(key)"},
    {"when", (PyCFunction)queue_when, METH_O, "when(key) -> float or None"},
    {"keys", (PyCFunction)queue_keys, METH_NOARGS, "keys() -> list"},
    {"heap_size", (PyCFunction)queue_heap_size, METH_NOARGS,
     "heap_size() -> int"},
    {"earliest", (PyCFunction)queue_earliest, METH_NOARGS,
     "earliest() -> float or None"},
    {"pop_due", (PyCFunction)(void (*)(void))queue_pop_due, METH_FASTCALL,
     "pop_due(limit, newest) -> key or None"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef queue_getset[] = {
    {"counter", (getter)queue_get_counter, NULL,
     "The number of the newest heap entry.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods queue_as_sequence = {
    .sq_length = (lenfunc)queue_len,
    .sq_contains = (objobjproc)queue_contains,
};

SP_INTERNAL PyTypeObject DeadlineQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.ssp._speedups.DeadlineQueue",
    .tp_doc = "The compiled twin of broker.deadlines.DeadlineQueue.",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = queue_new,
    .tp_traverse = (traverseproc)queue_traverse,
    .tp_clear = (inquiry)queue_clear,
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_methods = queue_methods,
    .tp_getset = queue_getset,
    .tp_as_sequence = &queue_as_sequence,
};
