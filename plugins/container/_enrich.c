/* SPDX-License-Identifier: Apache-2.0 */
/* The container enricher's per-event loop in C (ContainerEnricher.enrich_batch).
 *
 * Equal in effect to the Python loop in plugins/container/enricher.py, which
 * is the reference (tests/test_speedups.py runs both on the same batches).
 * Within a batch most events share a few owners; for an event whose owner key
 * (owner_pid, owner cgroup id, owner_start) the batch has already answered, at
 * an earlier or equal event time, it merges the remembered fields into the
 * event's `extra`. Everything else - the first event of an owner in the batch,
 * an earlier event, a key that is not plain ints, an event that is not the
 * slotted Event - is handed back to Python (one(e)), in order, which looks it
 * up and remembers the answer in `hits`. Optional (setup.py): without a
 * compiler the Python loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "event_slots.h"

static event_slots_t slots;
static PyObject *S_pid, *S_cgroup, *S_start;

/* 1: v is an exact int or None (what a memo key may hold); 0: not */
static int id_type(PyObject *v) {
    return v == Py_None || PyLong_CheckExact(v);
}

/* The event's owner key as a new tuple; NULL with no error: not memo-able
 * here (Python decides); NULL with an error: failure. Mirrors _owner_ids for
 * plain ints and None; anything else goes to Python, so no Python code runs
 * while the borrowed values are in hand. */
static PyObject *owner_key(PyObject *e, PyObject *extra) {
    PyObject *pid = PyDict_GetItemWithError(extra, S_pid);
    if (pid == NULL && PyErr_Occurred()) return NULL;
    PyObject *cg = PyDict_GetItemWithError(extra, S_cgroup);
    if (cg == NULL && PyErr_Occurred()) return NULL;
    PyObject *start = PyDict_GetItemWithError(extra, S_start);
    if (start == NULL && PyErr_Occurred()) return NULL;
    if (pid == NULL) pid = Py_None;
    if (cg == NULL) cg = Py_None;
    if (start == NULL) start = Py_None;
    if (!id_type(pid) || !id_type(cg) || !id_type(start)) return NULL;
    int falsy = cg == Py_None ? 1 : PyObject_Not(cg);    /* an exact int: no Python code */
    if (falsy < 0) return NULL;
    if (falsy && pid != Py_None) {
        /* the on-CPU task's cgroup when that task is the owner */
        PyObject *epid = EVENT_SLOT(&slots, e, F_PID);
        if (epid == NULL || !PyLong_CheckExact(epid)) return NULL;
        int same = PyObject_RichCompareBool(pid, epid, Py_EQ);
        if (same < 0) return NULL;
        if (same) {
            cg = EVENT_SLOT(&slots, e, F_CG);
            if (cg == NULL || !id_type(cg)) return NULL;
        }
    }
    return PyTuple_Pack(3, pid, cg, start);
}

/* 1: merged from hits; 0: not answered here; -1: error */
static int from_hits(PyObject *e, PyObject *extra, PyObject *hits) {
    PyObject *key = owner_key(e, extra);
    if (key == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *hit = PyDict_GetItemWithError(hits, key);     /* borrowed */
    Py_DECREF(key);
    if (hit == NULL) return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2 || !PyDict_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
        PyErr_SetString(PyExc_TypeError, "container hits are (event time, fields dict)");
        return -1;
    }
    PyObject *ts = EVENT_SLOT(&slots, e, F_TS), *made_at = PyTuple_GET_ITEM(hit, 0);
    if (ts == NULL || !PyLong_CheckExact(ts) || !PyLong_CheckExact(made_at)) return 0;   /* Python decides */
    int later = PyObject_RichCompareBool(ts, made_at, Py_GE);
    if (later <= 0) return later;
    return PyDict_Update(extra, PyTuple_GET_ITEM(hit, 1)) < 0 ? -1 : 1;
}

/* enrich(batch, hits, one) */
static PyObject *enrich(PyObject *self, PyObject *args) {
    PyObject *batch, *hits, *one_cb;
    if (!PyArg_ParseTuple(args, "O!O!O:enrich", &PyList_Type, &batch, &PyDict_Type, &hits, &one_cb))
        return NULL;
    /* the list may change under us only through the callback: index each time */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *e = PyList_GET_ITEM(batch, i);
        Py_INCREF(e);
        int rc = event_slots_bind(&slots, Py_TYPE(e));
        PyObject *extra = rc == 1 ? EVENT_SLOT(&slots, e, F_EXTRA) : NULL;
        if (rc >= 0 && extra != NULL && PyDict_CheckExact(extra)) {
            Py_INCREF(extra);
            rc = from_hits(e, extra, hits);
            Py_DECREF(extra);
        } else if (rc >= 0) {
            rc = 0;
        }
        if (rc == 0) {
            PyObject *r = PyObject_CallOneArg(one_cb, e);
            rc = r == NULL ? -1 : 0;
            Py_XDECREF(r);
        }
        Py_DECREF(e);
        if (rc < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"enrich", enrich, METH_VARARGS, "enrich(batch, hits, one) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_enrich", NULL, -1, methods};

PyMODINIT_FUNC PyInit__enrich(void) {
    if (!(S_pid = PyUnicode_InternFromString("owner_pid")) || !(S_cgroup = PyUnicode_InternFromString("owner_cgroup_id"))
        || !(S_start = PyUnicode_InternFromString("owner_start")))
        return NULL;
    return PyModule_Create(&module);
}
