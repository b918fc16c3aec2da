/* SPDX-License-Identifier: Apache-2.0 */
/* bcc's default and -w table rows in C: a batch of Events -> one bytes object.
 *
 * Byte-identical to format.py's `%` rows (tests/test_speedups.py checks it on
 * the bcc fixtures and on random events). Handles the rows without -T/-t;
 * the owner columns (--owner) come from Python, already made and escaped
 * (`owner_of(event) -> str`), and are placed after C-COMM. An event whose text is not plain ASCII (C's
 * `%-10.10s` counts bytes, Python's counts characters) goes to the Python
 * `fallback(event) -> bytes`, so the output never depends on which path ran.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "event_slots.h"

/* Event's fields straight from their slots when the event is the slotted
 * Event (a generic attribute lookup per field was a third of a row's cost);
 * any other type goes through getattr. Set per event by one(). */
static event_slots_t slots;
static int fast;

static PyObject *S_sk, *S_span, *S_pid, *S_comm, *S_fam, *S_saddr, *S_sport, *S_daddr, *S_dport,
    *S_old, *S_new;

/* A new reference to field `f` (named `name`) of obj, or NULL with an exception set. */
static PyObject *field(PyObject *obj, int f, PyObject *name) {
    if (fast) {
        PyObject *v = EVENT_SLOT(&slots, obj, f);
        if (v != NULL) return Py_NewRef(v);
    }
    return PyObject_GetAttr(obj, name);    /* also raises for an unset slot */
}

static int get_u64(PyObject *obj, int f, PyObject *name, unsigned long long *out) {
    PyObject *v = field(obj, f, name);
    if (!v) return -1;
    int ok = 0;
    if (PyLong_CheckExact(v)) {
        *out = PyLong_AsUnsignedLongLong(v);
        if (*out == (unsigned long long)-1 && PyErr_Occurred()) PyErr_Clear(); else ok = 1;
    }
    Py_DECREF(v);
    return ok;
}

/* a new reference to a printable-ASCII str attribute (1), or 0: anything
 * else - non-ASCII, a control character Python escapes (escape_text), or a
 * backslash: an escape, which Python's column cut keeps whole
 * (escaped_column) - is the Python row's to render; -1: error */
static int get_ascii(PyObject *obj, int f, PyObject *name, PyObject **out) {
    PyObject *v = field(obj, f, name);
    if (!v) return -1;
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) { Py_DECREF(v); return 0; }
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(v);
    for (Py_ssize_t i = 0, n = PyUnicode_GET_LENGTH(v); i < n; i++)
        if (c[i] < 0x20 || c[i] == 0x7f || c[i] == '\\') { Py_DECREF(v); return 0; }
    *out = v;
    return 1;
}

static const char *NAMES[13] = {NULL, "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
    "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"};

/* printf's conversions by hand: snprintf's format parsing was most of a
 * row's cost. Each writes at o and returns the end. */
static char *pad(char *o, char *start, int width) {       /* %-Ns: spaces up to width */
    while (o - start < width) *o++ = ' ';
    return o;
}
static char *dec(char *o, unsigned long long v) {          /* %llu */
    char t[24]; int n = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *o++ = t[--n];
    return o;
}
static char *hex(char *o, unsigned long long v) {          /* %llx */
    char t[24]; int n = 0;
    do { t[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    while (n) *o++ = t[--n];
    return o;
}
static char *str(char *o, const char *s, Py_ssize_t n, Py_ssize_t precision) {   /* %.Ps */
    if (precision >= 0 && n > precision) n = precision;
    memcpy(o, s, n);
    return o + n;
}
static char *state(char *o, unsigned long long s) {        /* %-11s of the name or number */
    char *start = o;
    s &= 255;
    if (s >= 1 && s <= 12) o = str(o, NAMES[s], (Py_ssize_t)strlen(NAMES[s]), -1); else o = dec(o, s);
    return pad(o, start, 11);
}
#define FIELD(expr, width) do { char *st_ = o; o = (expr); o = pad(o, st_, (width)); } while (0)

/* The owner columns by the identity of what they are made of. Python's
 * owner_of(e) makes them from seven values of e.extra (and whether it has
 * "cgroup" or "systemd_unit"), and is a pure function of those values and
 * of -w; enrichers hand every event of one owner the same value objects, so
 * a memo keyed by their identity - holding references, so no address can be
 * reused while an entry stands - answers most events without calling
 * Python. Only exact str, int and None are remembered (what owner_of's own
 * memo takes); anything else asks owner_of every time. */
#define OWNER_KEYS 7
static PyObject *S_extra, *S_cgroup, *S_unit, *OWNER_KEY[OWNER_KEYS];
static const char *OWNER_KEY_NAMES[OWNER_KEYS] = {"owner_pid", "owner_comm", "k8s_pod", "k8s_namespace",
                                                  "container_name", "container_id", "pod_uid"};
#define OWNER_MEMO 256
typedef struct { PyObject *v[OWNER_KEYS]; int flags; PyObject *text; } owner_memo_t;
static owner_memo_t owner_memo[OWNER_MEMO];

static PyObject *owner_columns(PyObject *e, int wide, PyObject *owner_of) {
    PyObject *extra = field(e, F_EXTRA, S_extra);
    if (extra == NULL) return NULL;
    PyObject *v[OWNER_KEYS];
    int memoable = PyDict_CheckExact(extra), flags = wide ? 1 : 0;
    uintptr_t h = (uintptr_t)wide;
    for (int i = 0; memoable && i < OWNER_KEYS; i++) {
        PyObject *x = PyDict_GetItemWithError(extra, OWNER_KEY[i]);        /* borrowed */
        if (x == NULL) {
            if (PyErr_Occurred()) { Py_DECREF(extra); return NULL; }
            x = Py_None;                                   /* .get(): missing is None */
        }
        if (x != Py_None && !PyUnicode_CheckExact(x) && !PyLong_CheckExact(x)) memoable = 0;
        v[i] = x;
        h = (h ^ ((uintptr_t)x >> 4)) * 0x9E3779B97F4A7C15ULL;
    }
    if (memoable) {
        int a = PyDict_Contains(extra, S_cgroup), b = a ? a : PyDict_Contains(extra, S_unit);
        if (a < 0 || b < 0) { Py_DECREF(extra); return NULL; }
        flags |= b ? 2 : 0;
    }
    Py_DECREF(extra);
    owner_memo_t *m = NULL;
    if (memoable) {
        m = &owner_memo[(h ^ (uintptr_t)flags) >> (8 * sizeof(uintptr_t) - 8)];
        if (m->text != NULL && m->flags == flags && memcmp(m->v, v, sizeof v) == 0)
            return Py_NewRef(m->text);
    }
    PyObject *text = PyObject_CallOneArg(owner_of, e);
    if (text == NULL) return NULL;
    if (m != NULL && PyUnicode_CheckExact(text)) {
        for (int i = 0; i < OWNER_KEYS; i++) Py_XSETREF(m->v[i], Py_NewRef(v[i]));
        Py_XSETREF(m->text, Py_NewRef(text));
        m->flags = flags;
    }
    return text;
}

/* 1 rendered, 0 fallback, -1 error */
static int one(char **pp, Py_ssize_t *len, Py_ssize_t *cap, PyObject *e, int wide, PyObject *owner_of) {
    unsigned long long sk, pid, fam, sport, dport, old, new_, span = 0;
    int r;
    if ((fast = event_slots_bind(&slots, Py_TYPE(e))) < 0) return -1;
#define U(f, name, var) if ((r = get_u64(e, f, name, &var)) <= 0) return r
    U(F_SK, S_sk, sk); U(F_PID, S_pid, pid); U(F_FAM, S_fam, fam); U(F_SPORT, S_sport, sport);
    U(F_DPORT, S_dport, dport); U(F_OLD, S_old, old); U(F_NEW, S_new, new_);
#undef U
    PyObject *spano = field(e, F_SPAN, S_span);
    if (!spano) return -1;
    int known = spano != Py_None;
    Py_DECREF(spano);
    if (known && (r = get_u64(e, F_SPAN, S_span, &span)) <= 0) return r;
    if (span / 1000 > (1ULL << 53)) return 0;      /* beyond exact doubles: Python's int/int */
    if (old > 255 || new_ > 255) return 0;          /* printed as the whole number: Python's */
    PyObject *comm = NULL, *sa = NULL, *da = NULL;
    if ((r = get_ascii(e, F_COMM, S_comm, &comm)) <= 0) return r;
    if ((r = get_ascii(e, F_SADDR, S_saddr, &sa)) <= 0) { Py_DECREF(comm); return r; }
    if ((r = get_ascii(e, F_DADDR, S_daddr, &da)) <= 0) { Py_DECREF(comm); Py_DECREF(sa); return r; }
    /* the owner columns (--owner), made and escaped by Python: owner_of(e) -> str */
    PyObject *owner = NULL;
    const char *ow = NULL; Py_ssize_t own = 0;
    if (owner_of != Py_None) {
        owner = owner_columns(e, wide, owner_of);
        if (owner == NULL || !PyUnicode_Check(owner)) {
            if (owner != NULL) PyErr_SetString(PyExc_TypeError, "owner_of: str");
            Py_XDECREF(owner); Py_DECREF(comm); Py_DECREF(sa); Py_DECREF(da);
            return -1;
        }
        if ((ow = PyUnicode_AsUTF8AndSize(owner, &own)) == NULL) {      /* surrogates: Python's bytes */
            PyErr_Clear();
            Py_DECREF(owner); Py_DECREF(comm); Py_DECREF(sa); Py_DECREF(da);
            return 0;
        }
    }
    Py_ssize_t need = PyUnicode_GET_LENGTH(sa) + PyUnicode_GET_LENGTH(da) + own + 512;
    if (*len + need > *cap) {
        Py_ssize_t c = *cap ? *cap : 65536;
        while (c < *len + need) c *= 2;
        char *p = PyMem_Realloc(*pp, c);
        if (!p) { Py_XDECREF(owner); Py_DECREF(comm); Py_DECREF(sa); Py_DECREF(da); PyErr_NoMemory(); return -1; }
        *pp = p; *cap = c;
    }
    unsigned long long us = known ? span / 1000 : 0;         /* bcc: whole µs, then ms */
    Py_ssize_t cn, sn, dn;
    const char *c = PyUnicode_AsUTF8AndSize(comm, &cn), *s = PyUnicode_AsUTF8AndSize(sa, &sn),
               *d = PyUnicode_AsUTF8AndSize(da, &dn);
    char *o = *pp + *len;
    FIELD(hex(o, sk), 16); *o++ = ' ';
    FIELD(dec(o, pid), 5); *o++ = ' ';
    if (wide) {
        /* "%-16llx %-5llu %-16.16s %-2s %-39s %-5llu %-39s %-5llu %-11s -> %-11s %.3f\n" */
        FIELD(str(o, c, cn, 16), 16); *o++ = ' ';
        if (own) { memcpy(o, ow, own); o += own; }
        *o++ = fam == 2 ? '4' : '6'; *o++ = ' '; *o++ = ' ';
        FIELD(str(o, s, sn, -1), 39); *o++ = ' ';
        FIELD(dec(o, sport), 5); *o++ = ' ';
        FIELD(str(o, d, dn, -1), 39); *o++ = ' ';
    } else {
        /* "%-16llx %-5llu %-10.10s %-15s %-5llu %-15s %-5llu %-11s -> %-11s %.3f\n" */
        FIELD(str(o, c, cn, 10), 10); *o++ = ' ';
        if (own) { memcpy(o, ow, own); o += own; }
        FIELD(str(o, s, sn, -1), 15); *o++ = ' ';
        FIELD(dec(o, sport), 5); *o++ = ' ';
        FIELD(str(o, d, dn, -1), 15); *o++ = ' ';
    }
    Py_XDECREF(owner); Py_DECREF(comm); Py_DECREF(sa); Py_DECREF(da);
    FIELD(dec(o, dport), 5); *o++ = ' ';
    o = state(o, old);
    memcpy(o, " -> ", 4); o += 4;
    o = state(o, new_);
    *o++ = ' ';
    if (us < (1ULL << 40)) {
        /* us/1000.0 is within 2^-12 of the decimal: %.3f prints exactly this */
        o = dec(o, us / 1000); *o++ = '.';
        unsigned f = (unsigned)(us % 1000);
        *o++ = (char)('0' + f / 100); *o++ = (char)('0' + f / 10 % 10); *o++ = (char)('0' + f % 10);
    } else {
        o += snprintf(o, 64, "%.3f", (double)us / 1000.0);
    }
    *o++ = '\n';
    *len = o - *pp;
    return 1;
}

/* rows(batch, wide, fallback, owner_of=None) -> bytes, one line (with newline) per event */
static PyObject *rows(PyObject *self, PyObject *args) {
    PyObject *batch, *fallback, *owner_of = Py_None; int wide;
    if (!PyArg_ParseTuple(args, "O!pO|O", &PyList_Type, &batch, &wide, &fallback, &owner_of)) return NULL;
    char *p = NULL; Py_ssize_t len = 0, cap = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *e = PyList_GET_ITEM(batch, i);
        Py_ssize_t mark = len;
        int r = one(&p, &len, &cap, e, wide, owner_of);
        if (r < 0) goto fail;
        if (r == 0) {
            len = mark;
            PyObject *line = PyObject_CallOneArg(fallback, e);
            if (!line) goto fail;
            if (!PyBytes_Check(line)) { Py_DECREF(line); PyErr_SetString(PyExc_TypeError, "fallback: bytes"); goto fail; }
            Py_ssize_t n = PyBytes_GET_SIZE(line);
            if (len + n + 1 > cap) {
                Py_ssize_t c = cap ? cap : 65536;
                while (c < len + n + 1) c *= 2;
                char *q = PyMem_Realloc(p, c);
                if (!q) { Py_DECREF(line); PyErr_NoMemory(); goto fail; }
                p = q; cap = c;
            }
            memcpy(p + len, PyBytes_AS_STRING(line), n);
            len += n;
            p[len++] = '\n';
            Py_DECREF(line);
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(p ? p : "", len);
    PyMem_Free(p);
    return out;
fail:
    PyMem_Free(p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"rows", rows, METH_VARARGS, "Events -> bcc table rows as bytes (see the module source)."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_rows", "bcc table rows in C.", -1, methods};

PyMODINIT_FUNC PyInit__rows(void) {
#define I(var, s) if (!(var = PyUnicode_InternFromString(s))) return NULL
    I(S_sk, "skaddr"); I(S_span, "span_ns"); I(S_pid, "pid"); I(S_comm, "comm"); I(S_fam, "family");
    I(S_saddr, "saddr"); I(S_sport, "sport"); I(S_daddr, "daddr"); I(S_dport, "dport");
    I(S_old, "oldstate"); I(S_new, "newstate");
    I(S_extra, "extra"); I(S_cgroup, "cgroup"); I(S_unit, "systemd_unit");
    for (int i = 0; i < OWNER_KEYS; i++) I(OWNER_KEY[i], OWNER_KEY_NAMES[i]);
#undef I
    return PyModule_Create(&mod);
}
