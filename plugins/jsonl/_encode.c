/* SPDX-License-Identifier: Apache-2.0 */
/* The JSON Lines hot path in C: a batch of Events -> one bytes object.
 *
 * Byte-identical to the pure-Python path (records.event_record + orjson.dumps,
 * tests/test_speedups.py checks it): same key order, orjson's compact form and
 * string escaping (", \, \b \f \n \r \t, other controls as \u00XX, everything
 * else as UTF-8). An event this code cannot render exactly (a float or a nested
 * object in `extra`, a non-UTF-8 string, a number out of range) is handed to
 * the Python `fallback(event, seq)`, so the output never depends on which
 * path ran. Optional: without a compiler the package works, only slower.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "event_slots.h"
#include <time.h>

/* The output is built in place in the bytes object it is returned as (no
 * copy at the end): sized from the previous batch's bytes per event, grown
 * if that was short, trimmed at the end (a shrinking realloc does not copy). */
typedef struct { PyObject *obj; char *p; Py_ssize_t len, cap; } buf_t;

static int grow_slow(buf_t *b, Py_ssize_t need) {
    Py_ssize_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + need) cap *= 2;
    if (b->obj == NULL) b->obj = PyBytes_FromStringAndSize(NULL, cap);
    else if (_PyBytes_Resize(&b->obj, cap) < 0) b->obj = NULL;   /* it freed the old one */
    if (b->obj == NULL) { b->p = NULL; b->len = b->cap = 0; return -1; }
    b->p = PyBytes_AS_STRING(b->obj); b->cap = cap;
    return 0;
}
/* inlined: most pieces are short literals, whose copy the compiler then
 * turns into a few moves instead of a memmove call */
static inline __attribute__((always_inline)) int grow(buf_t *b, Py_ssize_t need) {
    return b->len + need <= b->cap ? 0 : grow_slow(b, need);
}
static inline __attribute__((always_inline)) int put(buf_t *b, const char *s, Py_ssize_t n) {
    if (grow(b, n)) return -1;
    memcpy(b->p + b->len, s, n); b->len += n;
    return 0;
}
#define PUTS(b, lit) put((b), (lit), (Py_ssize_t)sizeof(lit) - 1)

/* Numbers by hand: snprintf's format parsing was a third of an event's cost. */
static const char DIGITS2[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";
static int put_u64(buf_t *b, unsigned long long v) {      /* two digits per division */
    char tmp[24]; int n = 24;
    /* 8 digits at a time in 32-bit arithmetic (cheaper than 64-bit steps) */
    while (v >= 100000000ULL) {
        uint32_t lo = (uint32_t)(v % 100000000ULL);
        v /= 100000000ULL;
        for (int k = 0; k < 4; k++) {
            unsigned d = (lo % 100) * 2; lo /= 100;
            tmp[--n] = DIGITS2[d + 1]; tmp[--n] = DIGITS2[d];
        }
    }
    uint32_t x = (uint32_t)v;
    while (x >= 100) { unsigned d = (x % 100) * 2; x /= 100; tmp[--n] = DIGITS2[d + 1]; tmp[--n] = DIGITS2[d]; }
    if (x >= 10) { unsigned d = x * 2; tmp[--n] = DIGITS2[d + 1]; tmp[--n] = DIGITS2[d]; }
    else tmp[--n] = (char)('0' + x);
    return put(b, tmp + n, 24 - n);
}
static int put_i64(buf_t *b, long long v) {
    if (v >= 0) return put_u64(b, (unsigned long long)v);
    if (PUTS(b, "-")) return -1;
    return put_u64(b, 0ULL - (unsigned long long)v);
}
static int put_hex(buf_t *b, unsigned long long v) {       /* %llx */
    char tmp[24]; int n = 24;
    do { tmp[--n] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    return put(b, tmp + n, 24 - n);
}
static int put_frac9(buf_t *b, long long v) {              /* %09lld of 0 <= v < 10^9 */
    char tmp[9];
    for (int i = 8; i >= 0; i--) { tmp[i] = (char)('0' + v % 10); v /= 10; }
    return put(b, tmp, 9);
}

/* The JSON text of recently seen str objects, by identity: a batch repeats
 * the same objects (field names, addresses, names from the decoder's and the
 * enrichers' caches). Each entry holds a reference to its str, so the
 * address cannot be reused by another object while the entry stands, and a
 * str's content never changes. */
#define STR_MEMO 256
#define STR_MEMO_MAX 62
typedef struct { PyObject *s; unsigned char len; char json[STR_MEMO_MAX]; } str_memo_t;
static str_memo_t str_memo[STR_MEMO];

/* 1: rendered; 0: cannot render exactly (fallback); -1: memory error */
static int put_str(buf_t *b, PyObject *s) {
    if (!PyUnicode_Check(s)) return 0;
    str_memo_t *m = &str_memo[((uintptr_t)s >> 4) & (STR_MEMO - 1)];
    if (m->s == s) return put(b, m->json, m->len) ? -1 : 1;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (!u) { PyErr_Clear(); return 0; }      /* lone surrogates: orjson refuses, Python decides */
    if (grow(b, n * 6 + 2)) return -1;
    Py_ssize_t start = b->len;
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)u[i];
        if (c >= 0x20 && c != '"' && c != '\\') { *o++ = (char)c; continue; }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default: {
            static const char hex[] = "0123456789abcdef";
            *o++ = 'u'; *o++ = '0'; *o++ = '0'; *o++ = hex[c >> 4]; *o++ = hex[c & 15];
        }
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    if (PyUnicode_CheckExact(s) && b->len - start <= STR_MEMO_MAX) {
        Py_XSETREF(m->s, Py_NewRef(s));
        m->len = (unsigned char)(b->len - start);
        memcpy(m->json, b->p + start, (size_t)m->len);
    }
    return 1;
}

/* The keys of `extra`, by identity: enrichers use the same str objects for
 * every event, so whether a key is a core field (skipped) and its rendered
 * `,"key":` are decided once per key object, not per event. Entries hold
 * their key, as the string memo does. */
#define KEY_MEMO 64
#define KEY_MEMO_MAX 60
typedef struct { PyObject *k; unsigned char len; char core; char text[KEY_MEMO_MAX]; } key_memo_t;
static key_memo_t key_memo[KEY_MEMO];
static PyObject *key_memo_core;       /* the core set the entries were decided against */

/* 1: rendered (or skipped: a core field); 0: fallback; -1: error */
static int put_key(buf_t *b, PyObject *k, PyObject *core, int *skip) {
    key_memo_t *m = &key_memo[((uintptr_t)k >> 4) & (KEY_MEMO - 1)];
    if (m->k == k && key_memo_core == core) {
        *skip = m->core;
        return m->core ? 1 : (put(b, m->text, m->len) ? -1 : 1);
    }
    int c = PySet_Contains(core, k);
    if (c < 0) return -1;
    *skip = c;
    if (c) return 1;   /* enrichers never overwrite core fields */
    Py_ssize_t start = b->len;
    int r;
    if (PUTS(b, ",")) return -1;
    if ((r = put_str(b, k)) <= 0) return r;
    if (PUTS(b, ":")) return -1;
    if (PyUnicode_CheckExact(k) && b->len - start <= KEY_MEMO_MAX) {
        if (key_memo_core != core) {   /* another core set: forget every entry */
            for (int i = 0; i < KEY_MEMO; i++) Py_CLEAR(key_memo[i].k);
            Py_XSETREF(key_memo_core, Py_NewRef(core));
        }
        Py_XSETREF(m->k, Py_NewRef(k));
        m->core = 0;
        m->len = (unsigned char)(b->len - start);
        memcpy(m->text, b->p + start, (size_t)m->len);
    }
    return 1;
}

/* Event's fields, read straight from their slots when the event's type is
 * the slotted Event (a generic attribute lookup per field was most of an
 * event's cost); any other type goes through getattr. */
static event_slots_t slots;
static PyObject *names[NFIELDS];

/* A new reference to field i of e, or NULL with an exception set. */
static PyObject *field(PyObject *e, int fast, int i) {
    if (fast) {
        PyObject *v = EVENT_SLOT(&slots, e, i);
        if (v != NULL) return Py_NewRef(v);
    }
    return PyObject_GetAttr(e, names[i]);   /* also raises for an unset slot */
}

/* 1: 0 <= v < 2^64, in *out; 0: not (no exception left set). The checked
 * conversion goes through a byte array for anything above 60 bits
 * (timestamps, socket addresses); on 3.11 the digits are read directly. */
static inline int as_u64(PyObject *v, unsigned long long *out) {
#if PY_VERSION_HEX < 0x030C0000
    Py_ssize_t size = Py_SIZE(v);
    if (size >= 0 && (size <= 2 || (size == 3 &&
            ((PyLongObject *)v)->ob_digit[2] < (1u << (64 - 2 * PyLong_SHIFT))))) {
        *out = PyLong_AsUnsignedLongLongMask(v);
        return 1;
    }
#endif
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow) {
        if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        if (x < 0) return 0;
        *out = (unsigned long long)x;
        return 1;
    }
    if (overflow < 0) return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    *out = u;
    return 1;
}

static int get_u64(PyObject *e, int fast, int i, unsigned long long *out) {
    PyObject *v = field(e, fast, i);
    if (!v) return -1;
    int ok = 0;
    if (PyLong_CheckExact(v)) {
        ok = as_u64(v, out);
    }
    Py_DECREF(v);
    return ok;
}

/* a value in `extra`: None, bool, int (64-bit), str, or a list of those */
static int put_value(buf_t *b, PyObject *v, int depth) {
    if (v == Py_None) return PUTS(b, "null") ? -1 : 1;
    if (v == Py_True) return PUTS(b, "true") ? -1 : 1;
    if (v == Py_False) return PUTS(b, "false") ? -1 : 1;
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
            return put_u64(b, u) ? -1 : 1;
        }
        if (overflow < 0 || (x == -1 && PyErr_Occurred())) { PyErr_Clear(); return 0; }
        return put_i64(b, x) ? -1 : 1;
    }
    if (PyUnicode_CheckExact(v)) return put_str(b, v);
    if (PyList_CheckExact(v) && depth == 0) {
        if (PUTS(b, "[")) return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
            if (i && PUTS(b, ",")) return -1;
            int r = put_value(b, PyList_GET_ITEM(v, i), 1);
            if (r <= 0) return r;
        }
        return PUTS(b, "]") ? -1 : 1;
    }
    return 0;   /* float, dict, tuple, ...: orjson's exact rendering is left to orjson */
}

/* 1 rendered, 0 fallback, -1 error */
static int one(buf_t *b, PyObject *e, unsigned long long seq, long long offset, PyObject *host,
               PyObject *states, PyObject *families, PyObject *core, long long *sec_cache,
               char *sec_text) {
    unsigned long long ts, sk, pid, tid, fam, sport, dport, old, new_, cg, span = 0;
    int r;
    int fast = event_slots_bind(&slots, Py_TYPE(e));
    if (fast < 0) return -1;
#define U(i, var) if ((r = get_u64(e, fast, i, &var)) <= 0) return r
    U(F_TS, ts); U(F_SK, sk); U(F_PID, pid); U(F_TID, tid); U(F_FAM, fam); U(F_SPORT, sport);
    U(F_DPORT, dport); U(F_OLD, old); U(F_NEW, new_); U(F_CG, cg);
#undef U
    PyObject *spano = field(e, fast, F_SPAN);
    if (!spano) return -1;
    int span_known = spano != Py_None;
    Py_DECREF(spano);
    if (span_known && (r = get_u64(e, fast, F_SPAN, &span)) <= 0) return r;
    if (fam > 255 || old > 255 || new_ > 255 || ts > (unsigned long long)LLONG_MAX) return 0;
    long long wall = (long long)ts + offset;
    if (wall < 0 || (offset > 0 && wall < (long long)ts)) return 0;
    long long sec = wall / 1000000000LL, frac = wall % 1000000000LL;
    if (sec != *sec_cache) {
        time_t t = (time_t)sec; struct tm tm;
        if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999) return 0;
        strftime(sec_text, 32, "%Y-%m-%dT%H:%M:%S", &tm);
        *sec_cache = sec;
    }
    if (PUTS(b, "{\"type\":\"state_change\",\"v\":1,\"seq\":") || put_u64(b, seq)
        || PUTS(b, ",\"time\":\"") || put(b, sec_text, (Py_ssize_t)strlen(sec_text)) || PUTS(b, ".")
        || put_frac9(b, frac) || PUTS(b, "Z\",\"time_ns\":") || put_i64(b, wall)
        || PUTS(b, ",\"mono_ns\":") || put_u64(b, ts) || PUTS(b, ",\"host\":"))
        return -1;
    Py_ssize_t hn; char *hp;
    if (PyBytes_AsStringAndSize(host, &hp, &hn) || put(b, hp, hn)) return -1;
    if (PUTS(b, ",\"skaddr\":\"") || put_hex(b, sk) || PUTS(b, "\",\"family\":")) return -1;
    PyObject *f = PyTuple_GET_ITEM(families, fam);
    if (put(b, PyBytes_AS_STRING(f), PyBytes_GET_SIZE(f)) || PUTS(b, ",\"laddr\":")) return -1;
    PyObject *v = field(e, fast, F_SADDR);
    if (!v) return -1;
    r = put_str(b, v); Py_DECREF(v);
    if (r <= 0) return r;
    if (PUTS(b, ",\"lport\":") || put_u64(b, sport) || PUTS(b, ",\"raddr\":")) return -1;
    v = field(e, fast, F_DADDR);
    if (!v) return -1;
    r = put_str(b, v); Py_DECREF(v);
    if (r <= 0) return r;
    if (PUTS(b, ",\"rport\":") || put_u64(b, dport) || PUTS(b, ",\"oldstate\":")) return -1;
    PyObject *st = PyTuple_GET_ITEM(states, old);
    if (put(b, PyBytes_AS_STRING(st), PyBytes_GET_SIZE(st)) || PUTS(b, ",\"newstate\":")) return -1;
    st = PyTuple_GET_ITEM(states, new_);
    if (put(b, PyBytes_AS_STRING(st), PyBytes_GET_SIZE(st))) return -1;
    if (PUTS(b, ",\"span_us\":") || (span_known ? put_u64(b, span / 1000) : PUTS(b, "null"))
        || PUTS(b, ",\"pid\":") || put_u64(b, pid) || PUTS(b, ",\"tid\":") || put_u64(b, tid)
        || PUTS(b, ",\"comm\":"))
        return -1;
    v = field(e, fast, F_COMM);
    if (!v) return -1;
    r = put_str(b, v); Py_DECREF(v);
    if (r <= 0) return r;
    if (PUTS(b, ",\"cgroup_id\":") || put_u64(b, cg)) return -1;
    PyObject *extra = field(e, fast, F_EXTRA);
    if (!extra) return -1;
    r = 1;
    if (!PyDict_CheckExact(extra)) r = 0;
    else {
        Py_ssize_t pos = 0; PyObject *k, *val;
        while (PyDict_Next(extra, &pos, &k, &val)) {
            if (!PyUnicode_CheckExact(k)) { r = 0; break; }
            int skip = 0;
            if ((r = put_key(b, k, core, &skip)) <= 0) break;
            if (skip) continue;
            if ((r = put_value(b, val, 0)) <= 0) break;
        }
    }
    Py_DECREF(extra);
    if (r <= 0) return r;
    return PUTS(b, "}\n") ? -1 : 1;
}

/* encode(batch, seq, offset, host_json, states, families, core, fallback) -> (bytes, seq) */
static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *batch, *host, *states, *families, *core, *fallback;
    unsigned long long seq; long long offset;
    if (!PyArg_ParseTuple(args, "O!KLO!O!O!O!O", &PyList_Type, &batch, &seq, &offset, &PyBytes_Type,
                          &host, &PyTuple_Type, &states, &PyTuple_Type, &families, &PyFrozenSet_Type,
                          &core, &fallback))
        return NULL;
    if (PyTuple_GET_SIZE(states) != 256 || PyTuple_GET_SIZE(families) != 256) {
        PyErr_SetString(PyExc_ValueError, "states and families: 256 pre-encoded names each");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < 256; i++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(states, i)) || !PyBytes_Check(PyTuple_GET_ITEM(families, i))) {
            PyErr_SetString(PyExc_TypeError, "state and family names must be bytes");
            return NULL;
        }
    buf_t b = {0};
    static Py_ssize_t per_event = 512;   /* bytes per event of the last batch */
    Py_ssize_t n_events = PyList_GET_SIZE(batch);
    if (grow_slow(&b, n_events * (per_event + per_event / 8) + 1024) < 0) return NULL;
    long long sec_cache = -1; char sec_text[32] = "";
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *e = PyList_GET_ITEM(batch, i);
        seq++;
        Py_ssize_t mark = b.len;
        int r = one(&b, e, seq, offset, host, states, families, core, &sec_cache, sec_text);
        if (r < 0) goto fail;
        if (r == 0) {
            b.len = mark;
            PyObject *line = PyObject_CallFunction(fallback, "OK", e, seq);
            if (!line) goto fail;
            if (!PyBytes_Check(line)) { Py_DECREF(line); PyErr_SetString(PyExc_TypeError, "fallback: bytes"); goto fail; }
            int bad = put(&b, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line));
            Py_DECREF(line);
            if (bad) goto fail;
        }
    }
    /* capped: one huge line must not make the next batch allocate its size per event */
    if (n_events) per_event = b.len / n_events + 1 < 4096 ? b.len / n_events + 1 : 4096;
    if (_PyBytes_Resize(&b.obj, b.len) < 0) return NULL;
    return Py_BuildValue("(NK)", b.obj, seq);
fail:
    Py_XDECREF(b.obj);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "Events -> JSON Lines bytes (see the module source)."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_encode", "JSON Lines encoder in C.", -1, methods};

PyMODINIT_FUNC PyInit__encode(void) {
    for (int i = 0; i < NFIELDS; i++)
        if (!(names[i] = PyUnicode_InternFromString(EVENT_FIELD_NAMES[i]))) return NULL;
    return PyModule_Create(&mod);
}
