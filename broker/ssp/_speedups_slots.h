/*
 * broker/ssp/_speedups_slots.h: the offset of a class's __slots__ entry,
 * for the compiled modules that read and write the slots of the Python
 * classes they are given (broker/ssp/_speedups*.c and
 * broker/registry/_speedups.c). Include after Python.h and structmember.h.
 */

#ifndef SP_SPEEDUPS_SLOTS_H
#define SP_SPEEDUPS_SLOTS_H

/* The offset of cls.<name>, which must be a plain object slot of cls (or
 * of a class it derives from: a descriptor taken from an unrelated class
 * would give another layout's offset). */
static inline int
slot_offset(PyTypeObject *cls, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)cls, name);
    if (descr == NULL)
        return -1;
    int plain = Py_IS_TYPE(descr, &PyMemberDescr_Type)
        && PyType_IsSubtype(cls, PyDescr_TYPE(descr))
        && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
    if (plain)
        *offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    if (!plain) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ entry", cls->tp_name, name);
        return -1;
    }
    return 0;
}

#endif
