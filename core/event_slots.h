/* SPDX-License-Identifier: Apache-2.0 */
/* event_slots.h - Event's fields as object slots, for the optional C speed-ups.
 *
 * tcpstates.events.Event is a slots dataclass: each field is a member
 * descriptor at a fixed offset in the instance. Reading and writing those
 * offsets directly is what makes the C paths cheap (a generic attribute
 * lookup per field cost more than the rest of the work). Used by the kernel
 * decoder, the JSON Lines encoder and the owner enricher's loop; header-only
 * (static functions), so each extension carries its own copy of the table.
 */
#ifndef TCPSTATES_EVENT_SLOTS_H
#define TCPSTATES_EVENT_SLOTS_H

#include <Python.h>
#include <structmember.h>

/* Event's fields in declaration order (core/events.py) */
enum { F_TS, F_SK, F_SPAN, F_PID, F_TID, F_COMM, F_FAM, F_SADDR, F_SPORT, F_DADDR, F_DPORT, F_OLD,
       F_NEW, F_CG, F_EXTRA, NFIELDS };
static const char *const EVENT_FIELD_NAMES[NFIELDS] = {
    "ts_ns", "skaddr", "span_ns", "pid", "tid", "comm", "family", "saddr", "sport", "daddr", "dport",
    "oldstate", "newstate", "cgroup_id", "extra"};

typedef struct {
    PyTypeObject *type;          /* the type `offset` belongs to (a strong reference) */
    PyTypeObject *not_slotted;   /* the last type found without the slots (no reference: a hint) */
    Py_ssize_t offset[NFIELDS];
} event_slots_t;

/* 1: every field of type t is an object slot (offsets in s); 0: not (no
 * exception); -1: error. Looked up through the MRO, so a subclass that
 * overrides a field with a property is "not slotted". */
static int event_slots_bind(event_slots_t *s, PyTypeObject *t) {
    if (t == s->type) return 1;
    if (t == s->not_slotted) return 0;
    Py_ssize_t found[NFIELDS];
    for (int i = 0; i < NFIELDS; i++) {
        PyObject *name = PyUnicode_InternFromString(EVENT_FIELD_NAMES[i]);
        if (name == NULL) return -1;
        PyObject *d = _PyType_Lookup(t, name);      /* borrowed */
        Py_DECREF(name);
        if (d == NULL || !PyObject_TypeCheck(d, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            s->not_slotted = t;
            return 0;
        }
        found[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    memcpy(s->offset, found, sizeof(found));
    Py_XSETREF(s->type, (PyTypeObject *)Py_NewRef((PyObject *)t));
    return 1;
}

/* The slot of field f of obj (borrowed; NULL when unset). Only after a bind
 * of Py_TYPE(obj) returned 1. */
#define EVENT_SLOT(s, obj, f) (*(PyObject **)((char *)(obj) + (s)->offset[f]))

#endif /* TCPSTATES_EVENT_SLOTS_H */
