"""Pure-Python twin of ``_fast._score``: filter, score and rank worker candidates.

Why arrays and not dicts: converting candidate dicts to arrays per call costs as much
as scoring them in Python, so discovery keeps its candidates in parallel arrays all the
time and both implementations take exactly those arrays.

Inputs (all of length ``n``, else ``ValueError``):

* ``load``, ``capacity``, ``gpu_score``, ``age_s``, ``latency_ms``: C-contiguous float64
  buffers (``array('d')``, a memoryview of one, a numpy float64 array...).
* ``region_match``, ``healthy``: C-contiguous one-byte buffers (``bytes``,
  ``bytearray``, ``array('B')``); any non-zero byte means true.
* ``weights``: ``(w_free, w_gpu, w_region, w_latency, w_age)``.
* ``max_age_s``: records older than this (or with a negative age) are dropped.
* ``limit``: at most this many results.

For each row ``i`` that is ``healthy`` and has ``0 <= age_s <= max_age_s``::

    free  = (capacity - load) / capacity if capacity > 0 else 0.0, clamped to [0, 1]
            (NaN -> 0.0)
    lat   = latency_ms / (latency_ms + 50.0) if latency_ms >= 0 else 0.5
            (+inf -> 1.0; negative means unknown; NaN -> 0.5)
    agef  = age_s / max_age_s if max_age_s > 0 else 0.0
    score = w_free*free + w_gpu*gpu_score + w_region*region - w_latency*lat - w_age*agef

evaluated left to right in exactly this order in both implementations, so the floats are
bit-identical (the extension is built with ``-ffp-contract=off``). A row whose score is
NaN (e.g. a NaN gpu_score) is dropped. Results are ordered best score first, ties by
lower index.

``score_rank`` returns the indices; ``score_values`` returns ``(index, score)`` pairs in
the same order (``limit=None`` means all kept rows), which is what the API shows.
"""

from __future__ import annotations

import heapq
import math
import sys
from typing import Any

from _fast._errors import (
    BYTE_FORMATS,
    FLOAT_FORMATS,
    bad_byte_format,
    bad_float_format,
    check_limit,
    check_max_age,
    check_weights,
    length_mismatch,
    not_buffer,
)

_INF = math.inf
_FLOATS = FLOAT_FORMATS if sys.byteorder == "little" else FLOAT_FORMATS - {"<d"}


def _view(name: str, obj: Any) -> memoryview:
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(not_buffer(name, obj)) from None
    if not mv.c_contiguous:
        raise ValueError(not_buffer(name, obj))
    return mv


def _float_view(name: str, obj: Any) -> memoryview:
    mv = _view(name, obj)
    if mv.format not in _FLOATS or mv.itemsize != 8:
        raise TypeError(bad_float_format(name, mv.format, mv.itemsize))
    if mv.format != "d" or mv.ndim != 1:
        mv = mv.cast("B").cast("d")
    return mv


def _byte_view(name: str, obj: Any) -> memoryview:
    mv = _view(name, obj)
    if mv.format not in BYTE_FORMATS or mv.itemsize != 1:
        raise TypeError(bad_byte_format(name, mv.format, mv.itemsize))
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _check_all(load, capacity, gpu_score, age_s, latency_ms, region_match, healthy,
               weights, max_age_s):
    views = [_float_view("load", load)]
    n = len(views[0])
    for name, obj in (("capacity", capacity), ("gpu_score", gpu_score), ("age_s", age_s),
                      ("latency_ms", latency_ms)):
        mv = _float_view(name, obj)
        if len(mv) != n:
            raise ValueError(length_mismatch(name, len(mv), n))
        views.append(mv)
    for name, obj in (("region_match", region_match), ("healthy", healthy)):
        mv = _byte_view(name, obj)
        if len(mv) != n:
            raise ValueError(length_mismatch(name, len(mv), n))
        views.append(mv)
    return n, views, check_weights(weights), check_max_age(max_age_s)


def _scored(n, views, weights, max_age_s) -> list[tuple[float, int]]:
    """(-score, index) for every kept row, in index order."""
    load, capacity, gpu, age_s, latency, region, healthy = views
    wf, wg, wr, wl, wa = weights
    out = []
    for i in range(n):
        if not healthy[i]:
            continue
        age = age_s[i]
        if not (0.0 <= age <= max_age_s):
            continue
        cap = capacity[i]
        if cap > 0.0:
            free = (cap - load[i]) / cap
            if not (free >= 0.0):
                free = 0.0
            elif free > 1.0:
                free = 1.0
        else:
            free = 0.0
        lm = latency[i]
        if lm >= 0.0:
            lat = 1.0 if lm == _INF else lm / (lm + 50.0)
        else:
            lat = 0.5
        agef = age / max_age_s if max_age_s > 0.0 else 0.0
        r = 1.0 if region[i] else 0.0
        s = wf * free + wg * gpu[i] + wr * r - wl * lat - wa * agef
        if s != s:
            continue
        out.append((-s, i))
    return out


def _ranked(scored: list[tuple[float, int]], limit: int) -> list[tuple[float, int]]:
    if limit >= len(scored):
        return sorted(scored)
    return heapq.nsmallest(limit, scored)


def score_rank(load: Any, capacity: Any, gpu_score: Any, age_s: Any, latency_ms: Any,
               region_match: Any, healthy: Any, weights: Any, max_age_s: float,
               limit: int) -> list[int]:
    """Indices of the best ``limit`` kept rows, best score first, ties by lower index."""
    n, views, w, mx = _check_all(load, capacity, gpu_score, age_s, latency_ms,
                                 region_match, healthy, weights, max_age_s)
    limit = check_limit(limit)
    if limit == 0:
        return []
    return [i for _, i in _ranked(_scored(n, views, w, mx), limit)]


def score_values(load: Any, capacity: Any, gpu_score: Any, age_s: Any, latency_ms: Any,
                 region_match: Any, healthy: Any, weights: Any, max_age_s: float,
                 limit: int | None = None) -> list[tuple[int, float]]:
    """``(index, score)`` of the kept rows in ``score_rank`` order (all if ``limit`` is None)."""
    n, views, w, mx = _check_all(load, capacity, gpu_score, age_s, latency_ms,
                                 region_match, healthy, weights, max_age_s)
    scored = _scored(n, views, w, mx)
    lim = len(scored) if limit is None else check_limit(limit)
    return [(i, -s) for s, i in _ranked(scored, lim)]
