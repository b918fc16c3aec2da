/* SPDX-License-Identifier: Apache-2.0 */
/* The kernel stage's decoder in C: a block of ring records -> Event objects.
 *
 * Equal, field for field, to the pure-Python Decoder.decode_block
 * (plugins/kernel/decoder.py; tests/test_speedups.py compares them on random
 * and on real kernel records). It never formats a string itself: an address
 * or a thread name it has not seen is handed to the Python decoder's cache
 * and, on a miss there, to its slow path (inet_ntop, utf-8 "replace" +
 * escape_text), so the escaping rules exist once, in Python. What C adds is
 * a small direct-mapped memo (raw 16 bytes -> the str Python produced) that
 * spares building a bytes key per field, and building the slots instance
 * directly instead of through the dataclass __init__.
 * Optional (setup.py): without a compiler the pure-Python decoder runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "event_slots.h"

/* struct tcpstates_event (bpf/tcpstates.h) behind the ring's 8-byte header */
#define HDR 8
#define EVENT_SIZE 136
#define OFF_TS 0
#define OFF_SK 8
#define OFF_SPAN 16
#define OFF_CG 24
#define OFF_PID 32
#define OFF_TID 36
#define OFF_SPORT 40
#define OFF_DPORT 42
#define OFF_FAM 44
#define OFF_OLD 46
#define OFF_NEW 47
#define OFF_SADDR 48
#define OFF_DADDR 64
#define OFF_COMM 80
#define OFF_OWNER 96
#define OWNER_LEN 40

static event_slots_t slots;              /* Event's slot offsets (event_slots.h) */

/* The memo: raw bytes -> str, one table per kind (an IPv4 and an IPv6 key
 * with the same bytes are different texts). The mapping is a pure function
 * of the raw bytes, so an entry never goes stale. */
#define MEMO_BITS 10
#define MEMO_SIZE (1 << MEMO_BITS)
typedef struct { unsigned char key[16]; PyObject *value; } memo_t;
static memo_t memo[3][MEMO_SIZE];
enum { K_ADDR4, K_ADDR6, K_COMM };

static inline unsigned slot_of(const unsigned char *raw) {
    uint64_t lo, hi;
    memcpy(&lo, raw, 8);
    memcpy(&hi, raw + 8, 8);
    uint64_t h = lo * 0x9E3779B97F4A7C15ULL ^ (hi + 0x632BE59BD9B4E019ULL) * 0xC2B2AE3D27D4EB4FULL;
    return (unsigned)(h >> (64 - MEMO_BITS));
}

/* A new reference to the text of `raw`, or NULL with an exception set. */
/* The last int built per repeating field (pid, tid, ports, cgroup): a busy
 * host's records repeat them run after run, so the same immutable int is
 * shared instead of allocating one per event (a value is a value: nothing
 * can tell). One entry per field, kept across calls. */
enum { I_PID, I_TID, I_SPORT, I_DPORT, I_CG, NINTS };
typedef struct { uint64_t value; PyObject *obj; } int_memo_t;
static int_memo_t ints[NINTS];

static inline PyObject *int_of(int field, uint64_t value) {
    int_memo_t *m = &ints[field];
    if (m->obj != NULL && m->value == value)
        return Py_NewRef(m->obj);
    PyObject *obj = PyLong_FromUnsignedLongLong(value);
    if (obj != NULL) {
        Py_XSETREF(m->obj, Py_NewRef(obj));
        m->value = value;
    }
    return obj;
}

static PyObject *text_of(int kind, const unsigned char *raw, int family, PyObject *cache, PyObject *slow) {
    memo_t *m = &memo[kind][slot_of(raw)];
    if (m->value != NULL && memcmp(m->key, raw, 16) == 0) {
        Py_INCREF(m->value);
        return m->value;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)raw, 16);
    if (key == NULL) return NULL;
    PyObject *text = PyDict_GetItemWithError(cache, key);     /* borrowed */
    if (text != NULL && PyUnicode_Check(text) && PyUnicode_GET_LENGTH(text) > 0) {
        Py_INCREF(text);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    } else {
        /* the Python decoder's own slow path (it fills its cache) */
        text = kind == K_COMM ? PyObject_CallOneArg(slow, key)
                              : PyObject_CallFunction(slow, "iO", family, key);
        if (text == NULL) { Py_DECREF(key); return NULL; }
    }
    Py_DECREF(key);
    if (PyUnicode_Check(text)) {
        Py_XSETREF(m->value, Py_NewRef(text));
        memcpy(m->key, raw, 16);
    }
    return text;
}

static int bind_type(PyObject *type) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "event_type must be a type");
        return -1;
    }
    int r = event_slots_bind(&slots, (PyTypeObject *)type);
    if (r == 0) PyErr_SetString(PyExc_TypeError, "event_type: every field must be an object slot");
    return r == 1 ? 0 : -1;
}

#define U16(p) ((uint16_t)((p)[0] | ((p)[1] << 8)))
static inline uint32_t u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
#define SET(obj, f, v) (EVENT_SLOT(&slots, obj, f) = (v))

static const unsigned char ZERO_OWNER[OWNER_LEN];

/* The owner tails seen last, as the bytes objects handed out: a tail names a
 * process (identity, cgroup, how, name), so a storm repeats a few of them.
 * Handing out the same object spares an allocation per event and lets the
 * owner enricher's dict look-up use the hash the object keeps. */
#define OWNER_MEMO 256
typedef struct { unsigned char key[OWNER_LEN]; PyObject *value; } owner_memo_t;
static owner_memo_t owner_memo[OWNER_MEMO];

static PyObject *owner_bytes(const unsigned char *raw) {
    uint64_t h = 0x9E3779B97F4A7C15ULL, w;
    for (int i = 0; i < OWNER_LEN; i += 8) { memcpy(&w, raw + i, 8); h = (h ^ w) * 0xC2B2AE3D27D4EB4FULL; }
    owner_memo_t *m = &owner_memo[h >> (64 - 8)];
    if (m->value != NULL && memcmp(m->key, raw, OWNER_LEN) == 0) return Py_NewRef(m->value);
    PyObject *b = PyBytes_FromStringAndSize((const char *)raw, OWNER_LEN);
    if (b == NULL) return NULL;
    Py_XSETREF(m->value, Py_NewRef(b));
    memcpy(m->key, raw, OWNER_LEN);
    return b;
}

/* One Event from the record at p (past its header), or NULL. */
static PyObject *decode_one(const unsigned char *p, PyObject *caches[3], PyObject *slow_addr,
                            PyObject *slow_comm, PyObject *owner_key, PyObject *extra) {
    int fam = U16(p + OFF_FAM);
    int ak = fam == 2 ? K_ADDR4 : K_ADDR6;          /* AF_INET = 2, as decoder.py */
    uint64_t span = u64(p + OFF_SPAN);
    /* the texts first: they may call Python, which must not run with an
     * exception pending */
    if (extra == NULL) return NULL;
    PyObject *comm = text_of(K_COMM, p + OFF_COMM, fam, caches[K_COMM], slow_comm);
    if (comm == NULL) { Py_DECREF(extra); return NULL; }
    PyObject *saddr = text_of(ak, p + OFF_SADDR, fam, caches[ak], slow_addr);
    if (saddr == NULL) { Py_DECREF(extra); Py_DECREF(comm); return NULL; }
    PyObject *daddr = text_of(ak, p + OFF_DADDR, fam, caches[ak], slow_addr);
    if (daddr == NULL) { Py_DECREF(extra); Py_DECREF(comm); Py_DECREF(saddr); return NULL; }
    PyObject *ev = slots.type->tp_alloc(slots.type, 0);
    if (ev == NULL) { Py_DECREF(extra); Py_DECREF(comm); Py_DECREF(saddr); Py_DECREF(daddr); return NULL; }
    /* NULL slots are safe for dealloc: a half-built Event is simply dropped */
    SET(ev, F_TS, PyLong_FromUnsignedLongLong(u64(p + OFF_TS)));
    SET(ev, F_SK, PyLong_FromUnsignedLongLong(u64(p + OFF_SK)));
    SET(ev, F_SPAN, span == UINT64_MAX ? Py_NewRef(Py_None) : PyLong_FromUnsignedLongLong(span));
    SET(ev, F_PID, int_of(I_PID, u32(p + OFF_PID)));
    SET(ev, F_TID, int_of(I_TID, u32(p + OFF_TID)));
    SET(ev, F_COMM, comm);
    SET(ev, F_FAM, PyLong_FromLong(fam));
    SET(ev, F_SADDR, saddr);
    SET(ev, F_SPORT, int_of(I_SPORT, U16(p + OFF_SPORT)));
    SET(ev, F_DADDR, daddr);
    SET(ev, F_DPORT, int_of(I_DPORT, U16(p + OFF_DPORT)));
    SET(ev, F_OLD, PyLong_FromLong(p[OFF_OLD]));
    SET(ev, F_NEW, PyLong_FromLong(p[OFF_NEW]));
    SET(ev, F_CG, int_of(I_CG, u64(p + OFF_CG)));
    SET(ev, F_EXTRA, extra);
    for (int i = 0; i < NFIELDS; i++)
        if (EVENT_SLOT(&slots, ev, i) == NULL) {    /* out of memory */
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "decode: a field could not be built");
            Py_DECREF(ev);
            return NULL;
        }
    if (memcmp(p + OFF_OWNER, ZERO_OWNER, OWNER_LEN) != 0) {
        /* the owner fields, undecoded, for the owner enricher (decoder.py) */
        PyObject *raw = owner_bytes(p + OFF_OWNER);
        if (raw == NULL || PyDict_SetItem(extra, owner_key, raw) < 0) {
            Py_XDECREF(raw);
            Py_DECREF(ev);
            return NULL;
        }
        Py_DECREF(raw);
    }
    return ev;
}

/* struct tcpstates_conn_event: the event, then start_ns, last_ns, the ns
 * spent in each of 16 states, first_state, complete, closed, error_flags and
 * the s32 error (conndecoder.py CONN_STRUCT; tests compare both with the C). */
#define NSTATES 16
#define OFF_START EVENT_SIZE
#define OFF_LAST (EVENT_SIZE + 8)
#define OFF_STATES (EVENT_SIZE + 16)
#define OFF_FIRST (OFF_STATES + 8 * NSTATES)
#define OFF_ERROR (OFF_FIRST + 4)
#define CONN_SIZE (OFF_FIRST + 8)

/* Connection(start_ns, end_ns, state_ns, first_state, last_state, complete,
 * closed, last_ns, error, unsent, aborted) of the record at p (past its header), as conndecoder.py
 * builds it: state_ns holds the states with a non-zero time only. */
static PyObject *connection_of_record(const unsigned char *p, PyObject *conn_type) {
    PyObject *spent = PyDict_New();
    if (spent == NULL) return NULL;
    for (int s = 0; s < NSTATES; s++) {
        uint64_t ns = u64(p + OFF_STATES + 8 * s);
        if (ns == 0) continue;
        PyObject *k = PyLong_FromLong(s), *v = PyLong_FromUnsignedLongLong(ns);
        int bad = k == NULL || v == NULL || PyDict_SetItem(spent, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad) { Py_DECREF(spent); return NULL; }
    }
    int closed = p[OFF_FIRST + 2] != 0;
    int32_t error;
    memcpy(&error, p + OFF_ERROR, sizeof(error));
    /* 1: error read; 2 with it: nothing sent; 4 with it: aborted in FIN_WAIT2 (tcpstates.h) */
    int flags = p[OFF_FIRST + 3];
    PyObject *args[11] = {
        PyLong_FromUnsignedLongLong(u64(p + OFF_START)),
        closed ? PyLong_FromUnsignedLongLong(u64(p + OFF_TS)) : Py_NewRef(Py_None),
        spent,
        PyLong_FromLong(p[OFF_FIRST]),
        PyLong_FromLong(p[OFF_OLD]),
        PyBool_FromLong(p[OFF_FIRST + 1] != 0),
        PyBool_FromLong(closed),
        PyLong_FromUnsignedLongLong(u64(p + OFF_LAST)),
        (flags & 1) ? PyLong_FromLong(error) : Py_NewRef(Py_None),
        PyBool_FromLong((flags & 3) == 3),
        PyBool_FromLong((flags & 5) == 5),
    };
    PyObject *conn = NULL;
    int ok = 1;
    for (int i = 0; i < 11; i++) ok &= args[i] != NULL;
    if (ok) conn = PyObject_Vectorcall(conn_type, args, 11, NULL);
    for (int i = 0; i < 11; i++) Py_XDECREF(args[i]);
    return conn;
}

/* The extra dict of the record at p (past its header): empty for a state
 * change; for a connection record (conn_type set) holding its Connection
 * first, so the owner tail decode_one adds comes after it (as Python). */
static PyObject *extra_of_record(const unsigned char *p, PyObject *conn_type, PyObject *conn_key) {
    PyObject *extra = PyDict_New();
    if (extra == NULL || conn_type == NULL) return extra;
    PyObject *conn = connection_of_record(p, conn_type);
    if (conn == NULL || PyDict_SetItem(extra, conn_key, conn) < 0) {
        Py_XDECREF(conn);
        Py_DECREF(extra);
        return NULL;
    }
    Py_DECREF(conn);
    return extra;
}

/* Back-to-back ring records of `size` bytes (after their 8-byte header) ->
 * (events, bytes used); stops at the first header that is not exactly ours
 * (busy, discarded or foreign), as decoder.py and conndecoder.py do. */
static PyObject *decode_records(Py_buffer *buf, PyObject *type, uint32_t size, PyObject *caches[3],
                                PyObject *slow_addr, PyObject *slow_comm, PyObject *owner_key,
                                PyObject *conn_type, PyObject *conn_key) {
    if (bind_type(type) < 0) return NULL;
    const Py_ssize_t step = HDR + size;
    const unsigned char *data = buf->buf;
    Py_ssize_t n = buf->len / step;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        const unsigned char *rec = data + i * step;
        if (u32(rec) != size) break;
        PyObject *ev = decode_one(rec + HDR, caches, slow_addr, slow_comm, owner_key,
                                  extra_of_record(rec + HDR, conn_type, conn_key));
        if (ev == NULL || PyList_Append(out, ev) < 0) {
            Py_XDECREF(ev);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(ev);
    }
    return Py_BuildValue("(Nn)", out, i * step);
}

static PyObject *decode_block(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *type, *caches[3], *slow_addr, *slow_comm, *owner_key;
    if (!PyArg_ParseTuple(args, "y*OO!O!O!OOU:decode_block", &buf, &type, &PyDict_Type, &caches[K_ADDR4],
                          &PyDict_Type, &caches[K_ADDR6], &PyDict_Type, &caches[K_COMM],
                          &slow_addr, &slow_comm, &owner_key))
        return NULL;
    PyObject *out = decode_records(&buf, type, EVENT_SIZE, caches, slow_addr, slow_comm, owner_key, NULL, NULL);
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *decode_conn_block(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *type, *conn_type, *caches[3], *slow_addr, *slow_comm, *owner_key, *conn_key;
    if (!PyArg_ParseTuple(args, "y*OOO!O!O!OOUU:decode_conn_block", &buf, &type, &conn_type,
                          &PyDict_Type, &caches[K_ADDR4], &PyDict_Type, &caches[K_ADDR6],
                          &PyDict_Type, &caches[K_COMM], &slow_addr, &slow_comm, &owner_key, &conn_key))
        return NULL;
    PyObject *out = decode_records(&buf, type, CONN_SIZE, caches, slow_addr, slow_comm, owner_key,
                                   conn_type, conn_key);
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_block", decode_block, METH_VARARGS,
     "decode_block(data, Event, addr4, addr6, comms, slow_addr, slow_comm, owner_key) -> (events, used)"},
    {"decode_conn_block", decode_conn_block, METH_VARARGS,
     "decode_conn_block(data, Event, Connection, addr4, addr6, comms, slow_addr, slow_comm, owner_key, "
     "connection_key) -> (events, used)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) {
    return PyModule_Create(&module);
}
