/* SPDX-License-Identifier: Apache-2.0 */
/* The owner enricher's per-event loop in C (OwnerEnricher.observe_batch).
 *
 * Equal in effect to the Python loop in plugins/owner/enricher.py, which is
 * the reference (tests/test_speedups.py runs both on the same batches). For
 * the common event - the kernel named an owner - it does the whole work:
 * takes the raw owner tail out of `extra`, finds its fields in the enricher's
 * cache (or has Python make them), merges them, and forgets the socket from
 * the accept-queue set. Everything rarer is handed back to Python, event by
 * event and in order: a listener change or an accept by a process not known
 * to hold the listener (owned(e, accepter)), an event with no kernel owner
 * (unowned(e)) unless it is queued on a listener whose holders are cached
 * and fresh, an event whose type is not the slotted Event (one(e)).
 * Optional (setup.py): without a compiler the Python loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "event_slots.h"

static event_slots_t slots;
static PyObject *S_held, *S_candidates, *S_empty;

static int call1(PyObject *fn, PyObject *a) {
    PyObject *r = PyObject_CallOneArg(fn, a);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* 1: v is the int `want`; 0: not; -1: error */
static int is_long(PyObject *v, long want) {
    if (!PyLong_CheckExact(v)) return 0;
    int overflow = 0;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    return !overflow && x == want;
}

/* 1: the fields C compares are exact ints (what the decoder makes); an
 * IntEnum or a float state compares equal in Python in ways C would not
 * mirror, so such an event takes the Python path whole. */
static int plain_ints(PyObject *e) {
    static const int F[] = {F_OLD, F_NEW, F_FAM, F_SPORT, F_SK};
    for (size_t i = 0; i < sizeof(F) / sizeof(F[0]); i++) {
        PyObject *v = EVENT_SLOT(&slots, e, F[i]);
        if (v == NULL || !PyLong_CheckExact(v)) return 0;
    }
    return 1;
}

/* One event the kernel named an owner for (raw: its owner tail, borrowed). */
static int owned_one(PyObject *e, PyObject *extra, PyObject *raw, PyObject *key, long listen,
                     PyObject *cache, PyObject *make, PyObject *queued, PyObject *watches,
                     PyObject *owned_cb) {
    Py_INCREF(raw);                                   /* extra's reference goes below */
    PyObject *entry = PyDict_GetItemWithError(cache, raw);
    if (entry != NULL) {
        Py_INCREF(entry);
    } else if (PyErr_Occurred() || (entry = PyObject_CallOneArg(make, raw)) == NULL) {
        Py_DECREF(raw);
        return -1;
    }
    Py_DECREF(raw);
    int rc = -1;
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2 || !PyDict_CheckExact(PyTuple_GET_ITEM(entry, 0))) {
        PyErr_SetString(PyExc_TypeError, "owner cache entries are (fields dict, accepter)");
        goto out;
    }
    PyObject *fields = PyTuple_GET_ITEM(entry, 0), *accepter = PyTuple_GET_ITEM(entry, 1);
    if (PyDict_GET_SIZE(extra) == 1 && Py_REFCNT(extra) == 1) {
        /* only the raw tail was there, in a dict nobody else holds (what the
         * decoder makes): a copy of the fields replaces it, cheaper than a
         * delete and a growing update, and no one can tell */
        PyObject *fresh = PyDict_Copy(fields);
        if (fresh == NULL) goto out;
        Py_SETREF(EVENT_SLOT(&slots, e, F_EXTRA), fresh);
    } else if (PyDict_DelItem(extra, key) < 0 || PyDict_Update(extra, fields) < 0) {
        goto out;
    }
    PyObject *sk = EVENT_SLOT(&slots, e, F_SK);
    if (PySet_GET_SIZE(queued) && sk != NULL && PySet_Discard(queued, sk) < 0) goto out;
    PyObject *old = EVENT_SLOT(&slots, e, F_OLD), *new_ = EVENT_SLOT(&slots, e, F_NEW);
    PyObject *sport = EVENT_SLOT(&slots, e, F_SPORT);
    if (old == NULL || new_ == NULL || sport == NULL) {
        PyErr_SetString(PyExc_AttributeError, "an Event field is not set");
        goto out;
    }
    int hand_back = is_long(old, listen);
    if (hand_back == 0) hand_back = is_long(new_, listen);
    if (hand_back == 0 && (hand_back = PyObject_IsTrue(accepter)) == 1) {
        /* an accept on a watched port by a process not known to hold its
         * listener (a hand-off): Python invalidates the watch */
        PyObject *watch = PyDict_GetItemWithError(watches, sport);      /* borrowed */
        if (watch == NULL) {
            hand_back = PyErr_Occurred() ? -1 : 0;
        } else {
            PyObject *held = PyObject_GetAttr(watch, S_held);
            if (held == NULL) goto out;
            int known = PyDict_Check(held) ? PyDict_Contains(held, accepter) : 0;
            Py_DECREF(held);
            hand_back = known < 0 ? -1 : !known;
        }
    }
    if (hand_back < 0) goto out;
    if (hand_back) {
        PyObject *r = PyObject_CallFunctionObjArgs(owned_cb, e, accepter, NULL);
        if (r == NULL) goto out;
        Py_DECREF(r);
    }
    rc = 0;
out:
    Py_DECREF(entry);
    return rc;
}

/* The states and families the accept-queue path compares with (enricher.py). */
typedef struct {
    long listen, syn_recv, close, af_inet, af_inet6;
    PyObject *listeners, *wildcard, *any6, *now_cb;
    double now;      /* the batch's clock, read through now_cb at first need; < 0: not yet */
} queue_ctx;

/* The holders' fields of the listener an accept-queue event queues on, from
 * the enricher's listener cache (borrowed), or NULL: not cached or stale
 * (Python then looks it up), or an error (exception set). Mirrors
 * OwnerEnricher._holders' cache hit. */
static PyObject *cached_holders(queue_ctx *q, PyObject *e, PyObject *sport, PyObject *fam, long family) {
    PyObject *cached = PyDict_GetItemWithError(q->listeners, sport);
    if (cached == NULL || !PyTuple_CheckExact(cached) || PyTuple_GET_SIZE(cached) != 2
        || !PyFloat_CheckExact(PyTuple_GET_ITEM(cached, 0)) || !PyDict_CheckExact(PyTuple_GET_ITEM(cached, 1)))
        return NULL;
    if (q->now < 0) {
        PyObject *now = PyObject_CallNoArgs(q->now_cb);
        if (now == NULL) return NULL;
        q->now = PyFloat_AsDouble(now);
        Py_DECREF(now);
        if (q->now == -1.0 && PyErr_Occurred()) return NULL;
    }
    if (q->now > PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(cached, 0))) return NULL;
    PyObject *by_addr = PyTuple_GET_ITEM(cached, 1);
    PyObject *saddr = EVENT_SLOT(&slots, e, F_SADDR);
    PyObject *wild = PyDict_GetItemWithError(q->wildcard, fam);
    if (saddr == NULL || (wild == NULL && PyErr_Occurred())) return NULL;
    /* (family, address), (family, wildcard); an IPv4 event may also queue
     * on a dual-stack IPv6 listener: (AF_INET6, "::") */
    PyObject *k1 = PyTuple_Pack(2, fam, saddr), *k2 = PyTuple_Pack(2, fam, wild ? wild : S_empty);
    PyObject *k3 = family == q->af_inet ? Py_BuildValue("(lO)", q->af_inet6, q->any6) : NULL;
    PyObject *found = NULL;
    if (k1 != NULL && k2 != NULL && (k3 != NULL || family != q->af_inet)) {
        found = PyDict_GetItemWithError(by_addr, k1);
        if (found == NULL && !PyErr_Occurred()) found = PyDict_GetItemWithError(by_addr, k2);
        if (found == NULL && !PyErr_Occurred() && k3 != NULL) found = PyDict_GetItemWithError(by_addr, k3);
    }
    Py_XDECREF(k1);
    Py_XDECREF(k2);
    Py_XDECREF(k3);
    return found != NULL && PyDict_CheckExact(found) ? found : NULL;
}

/* An event the kernel knew no owner for: the accept-queue case with a fresh
 * cached listener is done here; everything else goes to Python. */
static int unowned_one(queue_ctx *q, PyObject *e, PyObject *extra, PyObject *queued, PyObject *unowned_cb) {
    PyObject *old = EVENT_SLOT(&slots, e, F_OLD), *new_ = EVENT_SLOT(&slots, e, F_NEW);
    PyObject *sk = EVENT_SLOT(&slots, e, F_SK), *sport = EVENT_SLOT(&slots, e, F_SPORT);
    PyObject *fam = EVENT_SLOT(&slots, e, F_FAM);
    if (old == NULL || new_ == NULL || sk == NULL || sport == NULL || fam == NULL || !PyLong_Check(fam))
        return call1(unowned_cb, e);
    int queue = is_long(old, q->listen);
    if (queue == 1) queue = is_long(new_, q->syn_recv);
    if (queue == 0) queue = PySet_Contains(queued, sk);
    if (queue < 0) return -1;
    if (!queue) return call1(unowned_cb, e);
    int overflow = 0;
    long family = PyLong_AsLongAndOverflow(fam, &overflow);
    if (family == -1 && PyErr_Occurred()) return -1;
    PyObject *fields = cached_holders(q, e, sport, fam, family);
    if (fields == NULL) return PyErr_Occurred() ? -1 : call1(unowned_cb, e);
    Py_INCREF(fields);
    int closing = is_long(new_, q->close);
    int rc = -1;
    if (closing < 0 || (closing ? PySet_Discard(queued, sk) : PySet_Add(queued, sk)) < 0
        || PyDict_Update(extra, fields) < 0)
        goto out;
    PyObject *cands = PyDict_GetItemWithError(fields, S_candidates);
    if (cands != NULL) {                              /* each event its own list */
        PyObject *copy = PySequence_List(cands);
        if (copy == NULL) goto out;
        int bad = PyDict_SetItem(extra, S_candidates, copy);
        Py_DECREF(copy);
        if (bad < 0) goto out;
    } else if (PyErr_Occurred()) {
        goto out;
    }
    rc = 0;
out:
    Py_DECREF(fields);
    return rc;
}

/* observe(batch, key, LISTEN, cache, make, queued, watches, owned, unowned, one,
 *         (SYN_RECV, CLOSE, AF_INET, AF_INET6), listeners, wildcard, "::", now) */
static PyObject *observe(PyObject *self, PyObject *args) {
    PyObject *batch, *key, *cache, *make, *queued, *watches, *owned_cb, *unowned_cb, *one_cb;
    long listen;
    queue_ctx q = {.now = -1.0};
    if (!PyArg_ParseTuple(args, "O!UlO!OO!O!OOO(llll)O!O!UO:observe", &PyList_Type, &batch, &key, &listen,
                          &PyDict_Type, &cache, &make, &PySet_Type, &queued, &PyDict_Type, &watches,
                          &owned_cb, &unowned_cb, &one_cb, &q.syn_recv, &q.close, &q.af_inet, &q.af_inet6,
                          &PyDict_Type, &q.listeners, &PyDict_Type, &q.wildcard, &q.any6, &q.now_cb))
        return NULL;
    q.listen = listen;
    /* the list may change under us only through the callbacks: index each time */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *e = PyList_GET_ITEM(batch, i);
        Py_INCREF(e);
        int rc, fast = event_slots_bind(&slots, Py_TYPE(e));
        PyObject *extra = fast == 1 ? EVENT_SLOT(&slots, e, F_EXTRA) : NULL;
        if (fast < 0) {
            rc = -1;
        } else if (extra == NULL || !PyDict_CheckExact(extra) || !plain_ints(e)) {
            rc = call1(one_cb, e);                    /* not ours to take apart */
        } else {
            PyObject *raw = PyDict_GetItemWithError(extra, key);
            if (raw != NULL)
                rc = owned_one(e, extra, raw, key, listen, cache, make, queued, watches, owned_cb);
            else
                rc = PyErr_Occurred() ? -1 : unowned_one(&q, e, extra, queued, unowned_cb);
        }
        Py_DECREF(e);
        if (rc < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"observe", observe, METH_VARARGS,
     "observe(batch, key, LISTEN, cache, make, queued, watches, owned, unowned, one) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_observe", NULL, -1, methods};

PyMODINIT_FUNC PyInit__observe(void) {
    if (!(S_held = PyUnicode_InternFromString("held")) || !(S_empty = PyUnicode_FromString(""))
        || !(S_candidates = PyUnicode_InternFromString("owner_candidates")))
        return NULL;
    return PyModule_Create(&module);
}
