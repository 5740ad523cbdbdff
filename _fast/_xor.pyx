# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Exact XOR k-closest over a contiguous buffer of 20-byte ids (compiled kernel).

Why compiled: neighbour search and crawl ranking run for every DHT RPC; in Python it
costs 60-160 ns per id and most of a microsecond just to start. Here an id is three
big-endian words (64 + 64 + 32 bits) compared as integers, a bounded max-heap keeps the
k best, and almost every id is rejected after one word compare against the heap root.
(The selection itself is plain C below: it has to control its branches.)
The GIL is released for large inputs. Semantics and errors are those of
``_fast.xor_py`` (the pure-Python twin); see that module's docstring.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_Check, PyLong_FromSsize_t
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from _fast import xor_py as _twin

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int* overflow) except? -1
    bint PyList_CheckExact(object o)

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    static inline uint64_t rma_load_be64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return v;
    #else
        return __builtin_bswap64(v);
    #endif
    }
    static inline uint32_t rma_load_be32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return v;
    #else
        return __builtin_bswap32(v);
    #endif
    }

    /* A heap entry: the first 64 bits of the XOR distance and the id's index. The rest
       of the distance is read back from the buffer only when two first words tie
       (duplicates, or ids sharing 64 leading bits), which keeps entries small and the
       usual compare a single integer compare. */
    typedef struct { uint64_t d0; Py_ssize_t idx; } rma_ent;
    typedef struct { const unsigned char *base; uint64_t t1; uint32_t t2; } rma_ctx;

    /* 1 if a is farther from the target than b: (distance, index) order. */
    static int rma_tie_worse(const rma_ctx *c, const rma_ent *a, const rma_ent *b) {
        const unsigned char *pa = c->base + a->idx * 20, *pb = c->base + b->idx * 20;
        uint64_t a1 = rma_load_be64(pa + 8) ^ c->t1, b1 = rma_load_be64(pb + 8) ^ c->t1;
        if (a1 != b1) return a1 > b1;
        uint32_t a2 = rma_load_be32(pa + 16) ^ c->t2, b2 = rma_load_be32(pb + 16) ^ c->t2;
        if (a2 != b2) return a2 > b2;
        return a->idx > b->idx;
    }
    static inline int rma_worse(const rma_ctx *c, const rma_ent *a, const rma_ent *b) {
        if (__builtin_expect(a->d0 != b->d0, 1)) return a->d0 > b->d0;
        return rma_tie_worse(c, a, b);
    }

    /* Max-heap (farthest at the root). Replace the root with item, Floyd's way: walk
       the farther child down to a leaf (a select, not a branch to predict), then sift
       item up the little it needs -- a nearer item usually belongs near the bottom. */
    static inline void rma_replace_top(const rma_ctx *c, rma_ent *h, Py_ssize_t size,
                                       rma_ent item) {
        Py_ssize_t pos = 0, child;
        while ((child = 2 * pos + 1) + 1 < size) {
            uint64_t l = h[child].d0, r = h[child + 1].d0;
            if (__builtin_expect(l == r, 0))
                child += rma_tie_worse(c, &h[child + 1], &h[child]);
            else
                child += r > l;
            h[pos] = h[child];
            pos = child;
        }
        if (child < size) {
            h[pos] = h[child];
            pos = child;
        }
        while (pos > 0) {
            Py_ssize_t parent = (pos - 1) >> 1;
            if (!rma_worse(c, &item, &h[parent])) break;
            h[pos] = h[parent];
            pos = parent;
        }
        h[pos] = item;
    }

    /* Heap of the (up to) m nearest among ids 0, step, 2*step, ... < n whose first
       distance word is <= thr; returns how many it holds. An id enters only if strictly
       nearer than the root by (distance, index). */
    static Py_ssize_t rma_scan(const rma_ctx *c, uint64_t t0, Py_ssize_t n, Py_ssize_t step,
                               uint64_t thr, rma_ent *h, Py_ssize_t m) {
        const unsigned char *base = c->base;
        Py_ssize_t size = 0;
        for (Py_ssize_t i = 0; i < n; i += step) {
            uint64_t d0 = rma_load_be64(base + i * 20) ^ t0;
            if (d0 > thr) continue;                      /* most ids stop here */
            rma_ent e = {d0, i};
            if (size < m) {                              /* filling: plain push */
                Py_ssize_t pos = size++;
                while (pos > 0) {
                    Py_ssize_t parent = (pos - 1) >> 1;
                    if (!rma_worse(c, &e, &h[parent])) break;
                    h[pos] = h[parent];
                    pos = parent;
                }
                h[pos] = e;
                if (size == m) thr = h[0].d0;
                continue;
            }
            /* d0 <= root's: nearer unless the first words tie and the rest is not
               smaller (a later index never wins a full tie) */
            if (d0 == h[0].d0 && !rma_tie_worse(c, &h[0], &e)) continue;
            rma_replace_top(c, h, m, e);
            thr = h[0].d0;
        }
        return size;
    }

    /* The m nearest of n ids, nearest first, into h[0..m) (1 <= m <= n).
       A plain scan admits about m*ln(n/m) ids into the heap, each a couple of branch
       mispredictions. When n is large against m, a first pass over every 8th id gives
       a threshold that, with high probability, a few times m ids pass: far fewer heap
       operations (large n: the heap work is small next to the scan; no sample pass then,
       as it would cost memory bandwidth). If fewer than m pass (unlucky sample), the plain scan runs: the result
       is exact either way, since every id above the threshold is farther than every id
       below it. */
    static void rma_select(const unsigned char *base, Py_ssize_t n, const unsigned char *tgt,
                           rma_ent *h, Py_ssize_t m) {
        rma_ctx c = {base, rma_load_be64(tgt + 8), rma_load_be32(tgt + 16)};
        uint64_t t0 = rma_load_be64(tgt);
        Py_ssize_t size = 0;
        if (n >= 16 * m && n >= 128 && n <= 8192) {
            Py_ssize_t j = (2 * m + 7) / 8 + 2;          /* j <= m+2, and n/8 >= 16 */
            if (j > m) j = m;
            if (rma_scan(&c, t0, n, 8, UINT64_MAX, h, j) == j)
                size = rma_scan(&c, t0, n, 1, h[0].d0, h, m);
        }
        if (size < m)
            size = rma_scan(&c, t0, n, 1, UINT64_MAX, h, m);
        for (Py_ssize_t end = m - 1; end > 0; end--) {   /* heap sort: nearest first */
            rma_ent last = h[end];
            h[end] = h[0];
            rma_replace_top(&c, h, end, last);
        }
    }
    """
    ctypedef struct rma_ent:
        uint64_t d0
        Py_ssize_t idx
    void rma_select(const unsigned char* base, Py_ssize_t n, const unsigned char* tgt,
                    rma_ent* h, Py_ssize_t m) noexcept nogil
    uint64_t rma_load_be64(const unsigned char *p) nogil
    uint32_t rma_load_be32(const unsigned char *p) nogil

cdef enum:
    ID_LEN = 20
    NOGIL_MIN = 4096
    STACK_K = 64


cdef object diagnose(object target, object ids, object k, object items, bint with_items):
    """Slow path: let the twin raise the exact error the twin would raise."""
    if with_items:
        _twin.k_closest_items(target, ids, k, items)
    else:
        _twin.k_closest(target, ids, k)
    raise AssertionError("k_closest: argument check disagrees with the twin")  # pragma: no cover


cdef object run(object target, object ids, object k, object items, bint with_items):
    """Shared body: the k nearest indices, or the matching entries of ``items``."""
    cdef Py_buffer view
    cdef int overflow = 0
    cdef long long kk
    cdef Py_ssize_t n, m, i
    cdef rma_ent stack_heap[STACK_K]
    cdef rma_ent* h
    cdef const unsigned char* tgt
    cdef list out
    cdef object item
    if not PyBytes_Check(target) or PyBytes_GET_SIZE(target) != ID_LEN or not PyLong_Check(k):
        return diagnose(target, ids, k, items, with_items)
    if not PyObject_CheckBuffer(ids):
        return diagnose(target, ids, k, items, with_items)
    if with_items and not PyList_CheckExact(items):
        return diagnose(target, ids, k, items, with_items)
    try:
        PyObject_GetBuffer(ids, &view, PyBUF_SIMPLE)
    except BufferError:
        return diagnose(target, ids, k, items, with_items)
    try:
        if view.len % ID_LEN:
            return diagnose(target, ids, k, items, with_items)
        n = view.len // ID_LEN
        if with_items and PyList_GET_SIZE(items) != n:
            return diagnose(target, ids, k, items, with_items)
        kk = PyLong_AsLongLongAndOverflow(k, &overflow)
        if overflow < 0 or (overflow == 0 and kk < 0):
            return diagnose(target, ids, k, items, with_items)
        m = n if (overflow > 0 or kk >= n) else <Py_ssize_t>kk
        if m == 0:
            return []
        tgt = <const unsigned char*>PyBytes_AS_STRING(target)
        if m <= STACK_K:
            h = stack_heap
        else:
            h = <rma_ent*>malloc(m * sizeof(rma_ent))
            if h == NULL:
                raise MemoryError()
        try:
            if n > NOGIL_MIN:
                with nogil:
                    rma_select(<const unsigned char*>view.buf, n, tgt, h, m)
            else:
                rma_select(<const unsigned char*>view.buf, n, tgt, h, m)
            out = PyList_New(m)
            for i in range(m):
                if with_items:
                    item = <object>PyList_GET_ITEM(items, h[i].idx)
                else:
                    item = PyLong_FromSsize_t(h[i].idx)
                Py_INCREF(item)
                PyList_SET_ITEM(out, i, item)
            return out
        finally:
            if h != stack_heap:
                free(h)
    finally:
        PyBuffer_Release(&view)


def k_closest(target, ids, k):
    """Indices of the ``k`` ids in ``ids`` nearest ``target`` by XOR, nearest first.

    ``target``: bytes of length 20; ``ids``: C-contiguous buffer of n*20 bytes;
    ``k``: int >= 0. Ties by lower index. Same results and errors as ``xor_py.k_closest``.
    """
    return run(target, ids, k, None, False)


def k_closest_items(target, ids, k, items):
    """``[items[i] for i in k_closest(target, ids, k)]`` without the Python loop.

    ``items`` must be a list with one entry per id (the routing table's contacts).
    """
    return run(target, ids, k, items, True)


def xor_distance_cmp(a, b, target):
    """-1 if ``a`` is nearer ``target`` than ``b``, 1 if farther, 0 if equal distance."""
    cdef const unsigned char* pa
    cdef const unsigned char* pb
    cdef const unsigned char* pt
    cdef uint64_t x, y
    cdef uint32_t x2, y2
    cdef int off
    if not (PyBytes_Check(a) and PyBytes_Check(b) and PyBytes_Check(target)
            and PyBytes_GET_SIZE(a) == ID_LEN and PyBytes_GET_SIZE(b) == ID_LEN
            and PyBytes_GET_SIZE(target) == ID_LEN):
        return _twin.xor_distance_cmp(a, b, target)
    pa = <const unsigned char*>PyBytes_AS_STRING(a)
    pb = <const unsigned char*>PyBytes_AS_STRING(b)
    pt = <const unsigned char*>PyBytes_AS_STRING(target)
    for off in (0, 8):
        x = rma_load_be64(pa + off) ^ rma_load_be64(pt + off)
        y = rma_load_be64(pb + off) ^ rma_load_be64(pt + off)
        if x != y:
            return -1 if x < y else 1
    x2 = rma_load_be32(pa + 16) ^ rma_load_be32(pt + 16)
    y2 = rma_load_be32(pb + 16) ^ rma_load_be32(pt + 16)
    if x2 != y2:
        return -1 if x2 < y2 else 1
    return 0
