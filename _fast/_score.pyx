# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Worker filter + weighted score + top-k (compiled kernel).

Why compiled: discovery ranks every candidate of a service on every lookup; over arrays
this is a few ns per record instead of hundreds in Python. The float formula, operation
order, filters, NaN handling and tie-breaking are exactly those of ``_fast.score_py``
(see its docstring); the extension is built with ``-ffp-contract=off -fno-fast-math`` so
the scores are bit-identical to the twin's.
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBuffer_Release, PyObject_GetBuffer
from cpython.float cimport PyFloat_CheckExact
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromSsize_t
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport strcmp

from _fast import _errors
from _fast import score_py as _twin

cdef extern from *:
    """
    #include <math.h>
    /* One row's score, branch-free so the compiler can use selects instead of jumps on
       random data. Same values, same operation order as score_py._scored: every division
       is computed, then the formula's conditions pick the result. */
    #if defined(__GNUC__) && !defined(__clang__)
    __attribute__((optimize("no-trapping-math")))
    #endif
    static inline double rma_row_score(double load, double cap, double gpu, double age,
                                       double lm, unsigned char region, double wf, double wg,
                                       double wr, double wl, double wa, double max_age) {
        double free_ = (cap - load) / cap;
        free_ = (free_ >= 0.0) ? free_ : 0.0;
        free_ = (free_ > 1.0) ? 1.0 : free_;
        free_ = (cap > 0.0) ? free_ : 0.0;
        double lat = lm / (lm + 50.0);
        lat = (lm == INFINITY) ? 1.0 : lat;
        lat = (lm >= 0.0) ? lat : 0.5;
        double agef = age / max_age;
        agef = (max_age > 0.0) ? agef : 0.0;
        double r = region ? 1.0 : 0.0;
        return wf * free_ + wg * gpu + wr * r - wl * lat - wa * agef;
    }
    /* The scores of rows [0, len) into out: a straight loop the compiler vectorises
       (the divisions dominate; packed divides halve their cost). */
    #if defined(__GNUC__) && !defined(__clang__)
    __attribute__((optimize("no-trapping-math")))  /* lets it if-convert: same values */
    #endif
    static void rma_chunk_scores(const double *restrict load, const double *restrict cap,
                                 const double *restrict gpu, const double *restrict age,
                                 const double *restrict lm, const unsigned char *restrict region,
                                 const unsigned char *restrict healthy, double wf, double wg, double wr, double wl, double wa,
                                 double max_age, double *restrict out, Py_ssize_t len) {
        for (Py_ssize_t j = 0; j < len; j++) {
            double sc = rma_row_score(load[j], cap[j], gpu[j], age[j], lm[j], region[j],
                                      wf, wg, wr, wl, wa, max_age);
            /* Filtered rows become NaN, which the selection skips like a NaN score. */
            int keep = (healthy[j] != 0) & (0.0 <= age[j]) & (age[j] <= max_age);
            out[j] = keep ? sc : NAN;
        }
    }
    """
    void rma_chunk_scores(const double* load, const double* cap, const double* gpu,
                          const double* age, const double* lm, const unsigned char* region,
                          const unsigned char* healthy, double wf, double wg, double wr, double wl, double wa,
                          double max_age, double* out, Py_ssize_t len) noexcept nogil

cdef enum:
    NOGIL_MIN = 4096
    NBUF = 7
    NFLOAT = 5
    CHUNK = 256

ctypedef struct Scored:
    double s
    Py_ssize_t idx


cdef inline bint worse(const Scored* a, const Scored* b) noexcept nogil:
    """True if a ranks after b: lower score, or same score and higher index."""
    if a.s != b.s:
        return a.s < b.s
    return a.idx > b.idx


cdef inline void sift_down(Scored* h, Py_ssize_t size, Py_ssize_t pos) noexcept nogil:
    """Min-heap by rank (the worst kept row at the root)."""
    cdef Scored item = h[pos]
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


cdef inline void sift_up(Scored* h, Py_ssize_t pos) noexcept nogil:
    cdef Scored item = h[pos]
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not worse(&item, &h[parent]):
            break
        h[pos] = h[parent]
        pos = parent
    h[pos] = item


cdef Py_ssize_t rank(const double* load, const double* capacity, const double* gpu,
                     const double* age_s, const double* latency, const unsigned char* region,
                     const unsigned char* healthy, Py_ssize_t n,
                     double wf, double wg, double wr, double wl, double wa, double max_age,
                     Scored* h, Py_ssize_t m) noexcept nogil:
    """Keep the best m rows in h, sorted best first; return how many were kept."""
    cdef Py_ssize_t size = 0, end
    cdef double s
    cdef Scored e
    cdef double chunk[CHUNK]
    cdef Py_ssize_t base = 0, j, len_
    while base < n:
        len_ = n - base if n - base < CHUNK else CHUNK
        rma_chunk_scores(load + base, capacity + base, gpu + base, age_s + base,
                         latency + base, region + base, healthy + base,
                         wf, wg, wr, wl, wa, max_age, chunk, len_)
        for j in range(len_):
            s = chunk[j]
            if size == m and s > h[0].s:
                # Equal scores never replace: the root has the lower index. NaN never does.
                h[0].s = s
                h[0].idx = base + j
                sift_down(h, size, 0)
            elif size < m and s == s:
                h[size].s = s
                h[size].idx = base + j
                sift_up(h, size)
                size += 1
        base += len_
    end = size
    while end > 1:
        end -= 1
        e = h[0]
        h[0] = h[end]
        h[end] = e
        sift_down(h, end, 0)
    return size


cdef bint float_format(const char* fmt) noexcept:
    if fmt == NULL:
        return False
    return (strcmp(fmt, b"d") == 0 or strcmp(fmt, b"@d") == 0 or strcmp(fmt, b"=d") == 0
            or (LITTLE and strcmp(fmt, b"<d") == 0))


cdef bint byte_format(const char* fmt) noexcept:
    if fmt == NULL:
        return True
    return (strcmp(fmt, b"B") == 0 or strcmp(fmt, b"b") == 0 or strcmp(fmt, b"?") == 0
            or strcmp(fmt, b"c") == 0 or strcmp(fmt, b"@B") == 0 or strcmp(fmt, b"=B") == 0
            or strcmp(fmt, b"@b") == 0 or strcmp(fmt, b"=b") == 0)


import sys as _sys

cdef bint LITTLE = _sys.byteorder == "little"


cdef object _run(tuple bufs, object weights, object max_age_s, object limit, bint ranked_only,
                 bint all_rows):
    """Shared body of score_rank / score_values (bufs: the 7 input buffers in order)."""
    cdef Py_buffer views[NBUF]
    cdef int acquired = 0
    cdef Py_ssize_t n = 0, m, kept, i, nitems
    cdef double wf, wg, wr, wl, wa, mx
    cdef Scored* h = NULL
    cdef list out
    cdef object obj
    cdef bint ok = True
    try:
        for i in range(NBUF):
            obj = bufs[i]
            try:
                PyObject_GetBuffer(obj, &views[i], PyBUF_FORMAT | PyBUF_ND)
            except (BufferError, TypeError):
                ok = False
                break
            acquired += 1
            if i < NFLOAT:
                if not float_format(views[i].format) or views[i].itemsize != 8:
                    ok = False
                    break
            elif not byte_format(views[i].format) or views[i].itemsize != 1:
                ok = False
                break
            nitems = views[i].len // views[i].itemsize
            if i == 0:
                n = nitems
            elif nitems != n:
                ok = False
                break
        if not ok:
            _twin._check_all(*bufs, weights, max_age_s)
            raise AssertionError("score kernel: buffer checks disagree with the twin")
        if (type(weights) is tuple and PyTuple_GET_SIZE(weights) == 5
                and PyFloat_CheckExact(max_age_s)
                and PyFloat_CheckExact(<object>PyTuple_GET_ITEM(weights, 0))
                and PyFloat_CheckExact(<object>PyTuple_GET_ITEM(weights, 1))
                and PyFloat_CheckExact(<object>PyTuple_GET_ITEM(weights, 2))
                and PyFloat_CheckExact(<object>PyTuple_GET_ITEM(weights, 3))
                and PyFloat_CheckExact(<object>PyTuple_GET_ITEM(weights, 4))):
            wf, wg, wr, wl, wa = weights
            mx = max_age_s
        else:
            # Anything unusual (ints, lists, numpy scalars, junk): the twin's checks decide.
            wf, wg, wr, wl, wa = _errors.check_weights(weights)
            mx = _errors.check_max_age(max_age_s)
        if limit is None and all_rows:
            m = n
        else:
            limit = _errors.check_limit(limit)
            m = n if limit >= n else <Py_ssize_t>limit
        if m == 0:
            return []
        h = <Scored*>malloc(m * sizeof(Scored))
        if h == NULL:
            raise MemoryError()
        if n > NOGIL_MIN:
            with nogil:
                kept = rank(<const double*>views[0].buf, <const double*>views[1].buf,
                            <const double*>views[2].buf, <const double*>views[3].buf,
                            <const double*>views[4].buf, <const unsigned char*>views[5].buf,
                            <const unsigned char*>views[6].buf, n,
                            wf, wg, wr, wl, wa, mx, h, m)
        else:
            kept = rank(<const double*>views[0].buf, <const double*>views[1].buf,
                        <const double*>views[2].buf, <const double*>views[3].buf,
                        <const double*>views[4].buf, <const unsigned char*>views[5].buf,
                        <const unsigned char*>views[6].buf, n,
                        wf, wg, wr, wl, wa, mx, h, m)
        out = PyList_New(kept)
        for i in range(kept):
            if ranked_only:
                obj = PyLong_FromSsize_t(h[i].idx)
            else:
                obj = (h[i].idx, h[i].s)
            Py_INCREF(obj)
            PyList_SET_ITEM(out, i, obj)
        return out
    finally:
        if h != NULL:
            free(h)
        for i in range(acquired):
            PyBuffer_Release(&views[i])


def score_rank(load, capacity, gpu_score, age_s, latency_ms, region_match, healthy,
               weights, max_age_s, limit):
    """Indices of the best ``limit`` kept rows, best score first, ties by lower index.

    Same results (bit for bit) and errors as ``score_py.score_rank``.
    """
    return _run((load, capacity, gpu_score, age_s, latency_ms, region_match, healthy),
                weights, max_age_s, limit, True, False)


def score_values(load, capacity, gpu_score, age_s, latency_ms, region_match, healthy,
                 weights, max_age_s, limit=None):
    """``(index, score)`` of the kept rows in ``score_rank`` order (all if ``limit`` is None)."""
    return _run((load, capacity, gpu_score, age_s, latency_ms, region_match, healthy),
                weights, max_age_s, limit, False, True)
