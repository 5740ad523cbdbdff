# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Exact XOR k-closest over a contiguous buffer of 20-byte ids (compiled kernel).

Why compiled: neighbour search and crawl ranking run for every DHT RPC; in Python it
costs 60-160 ns per id and most of a microsecond just to start. Here an id is three
big-endian words (64 + 64 + 32 bits) compared as integers, a bounded max-heap keeps the
k best, and almost every id is rejected after one word compare against the heap root.
The GIL is released for large inputs. Semantics and errors are those of
``_fast.xor_py`` (the pure-Python twin); see that module's docstring.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_Check, PyLong_FromSsize_t
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from _fast import xor_py as _twin

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int* overflow) except? -1

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
    """
    uint64_t rma_load_be64(const unsigned char *p) nogil
    uint32_t rma_load_be32(const unsigned char *p) nogil

cdef enum:
    ID_LEN = 20
    NOGIL_MIN = 4096
    STACK_K = 64

ctypedef struct Entry:
    uint64_t d0
    uint64_t d1
    uint32_t d2
    Py_ssize_t idx


cdef inline bint worse(const Entry* a, const Entry* b) noexcept nogil:
    """True if a is farther than b (distance, then index)."""
    if a.d0 != b.d0:
        return a.d0 > b.d0
    if a.d1 != b.d1:
        return a.d1 > b.d1
    if a.d2 != b.d2:
        return a.d2 > b.d2
    return a.idx > b.idx


cdef inline void sift_down(Entry* h, Py_ssize_t size, Py_ssize_t pos) noexcept nogil:
    """Max-heap (farthest at the root) sift-down."""
    cdef Entry item = h[pos]
    cdef Py_ssize_t child
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and worse(&h[child + 1], &h[child]):
            child += 1
        if not worse(&h[child], &item):
            break
        h[pos] = h[child]
        pos = child
    h[pos] = item


cdef inline void sift_up(Entry* h, Py_ssize_t pos) noexcept nogil:
    cdef Entry item = h[pos]
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not worse(&item, &h[parent]):
            break
        h[pos] = h[parent]
        pos = parent
    h[pos] = item


cdef inline void replace(Entry* h, Py_ssize_t size, uint64_t d0, uint64_t d1, uint32_t d2,
                         Py_ssize_t i) noexcept nogil:
    h[0].d0 = d0
    h[0].d1 = d1
    h[0].d2 = d2
    h[0].idx = i
    sift_down(h, size, 0)


cdef Py_ssize_t select(const unsigned char* base, Py_ssize_t n, const unsigned char* tgt,
                       Entry* h, Py_ssize_t k) noexcept nogil:
    """Fill h with the k nearest ids, sorted nearest first; return how many (min(k, n))."""
    cdef uint64_t t0 = rma_load_be64(tgt)
    cdef uint64_t t1 = rma_load_be64(tgt + 8)
    cdef uint32_t t2 = rma_load_be32(tgt + 16)
    cdef Py_ssize_t i, size = 0, end
    cdef const unsigned char* p = base
    cdef Entry e
    cdef uint64_t d0, d1
    cdef uint32_t d2
    cdef Entry* root = h
    # Phase 1: the first k ids go straight into the heap.
    while size < k and size < n:
        e.d0 = rma_load_be64(p) ^ t0
        e.d1 = rma_load_be64(p + 8) ^ t1
        e.d2 = rma_load_be32(p + 16) ^ t2
        e.idx = size
        h[size] = e
        sift_up(h, size)
        size += 1
        p += ID_LEN
    # Phase 2: an id replaces the root only if strictly nearer (a later index loses ties).
    for i in range(size, n):
        d0 = rma_load_be64(p) ^ t0
        if d0 <= root.d0:
            d1 = rma_load_be64(p + 8) ^ t1
            if d0 < root.d0 or d1 < root.d1:
                d2 = rma_load_be32(p + 16) ^ t2
                replace(h, size, d0, d1, d2, i)
            elif d1 == root.d1:
                d2 = rma_load_be32(p + 16) ^ t2
                if d2 < root.d2:
                    replace(h, size, d0, d1, d2, i)
        p += ID_LEN
    # Heap-sort in place: repeatedly move the farthest to the end.
    end = size
    while end > 1:
        end -= 1
        e = h[0]
        h[0] = h[end]
        h[end] = e
        sift_down(h, end, 0)
    return size


cdef object diagnose(object target, object ids, object k):
    """Slow path: let the twin raise the exact error the twin would raise."""
    _twin.k_closest(target, ids, k)
    raise AssertionError("k_closest: argument check disagrees with the twin")  # pragma: no cover


def k_closest(target, ids, k):
    """Indices of the ``k`` ids in ``ids`` nearest ``target`` by XOR, nearest first.

    ``target``: bytes of length 20; ``ids``: C-contiguous buffer of n*20 bytes;
    ``k``: int >= 0. Ties by lower index. Same results and errors as ``xor_py.k_closest``.
    """
    cdef Py_buffer view
    cdef int overflow = 0
    cdef long long kk
    cdef Py_ssize_t n, m, i
    cdef Entry stack_heap[STACK_K]
    cdef Entry* h
    cdef const unsigned char* tgt
    cdef list out
    if not PyBytes_Check(target) or PyBytes_GET_SIZE(target) != ID_LEN or not PyLong_Check(k):
        return diagnose(target, ids, k)
    if not PyObject_CheckBuffer(ids):
        return diagnose(target, ids, k)
    try:
        PyObject_GetBuffer(ids, &view, PyBUF_SIMPLE)
    except BufferError:
        return diagnose(target, ids, k)
    try:
        if view.len % ID_LEN:
            return diagnose(target, ids, k)
        kk = PyLong_AsLongLongAndOverflow(k, &overflow)
        if overflow < 0 or (overflow == 0 and kk < 0):
            return diagnose(target, ids, k)
        n = view.len // ID_LEN
        m = n if (overflow > 0 or kk >= n) else <Py_ssize_t>kk
        if m == 0:
            return []
        tgt = <const unsigned char*>PyBytes_AS_STRING(target)
        if m <= STACK_K:
            h = stack_heap
        else:
            h = <Entry*>malloc(m * sizeof(Entry))
            if h == NULL:
                raise MemoryError()
        try:
            if n > NOGIL_MIN:
                with nogil:
                    select(<const unsigned char*>view.buf, n, tgt, h, m)
            else:
                select(<const unsigned char*>view.buf, n, tgt, h, m)
            out = PyList_New(m)
            for i in range(m):
                item = PyLong_FromSsize_t(h[i].idx)
                Py_INCREF(item)
                PyList_SET_ITEM(out, i, item)
            return out
        finally:
            if h != stack_heap:
                free(h)
    finally:
        PyBuffer_Release(&view)


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
