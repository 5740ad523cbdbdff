"""Pure-Python twin of ``_fast._xor``: exact XOR k-closest over a buffer of 20-byte ids.

Why a twin: the agent must run (slower) where the Cython extension could not be built,
and the tests need an independent, obviously-correct implementation to compare the
compiled kernel against. Both raise the same exception types for the same bad input
(messages come from :mod:`_fast._errors`).

Semantics (shared with the compiled kernel):

* ``target`` must be ``bytes`` of exactly 20 bytes (``TypeError`` / ``ValueError``).
* ``ids`` is any C-contiguous object supporting the buffer protocol (``bytes``,
  ``bytearray``, ``memoryview``, ``array``...), read as raw bytes; its size must be a
  multiple of 20. It holds ``n`` ids back to back.
* ``k`` is an ``int`` >= 0; ``k > n`` simply returns all ``n`` indices.
* The result lists the indices of the ``min(k, n)`` ids nearest to ``target`` by XOR
  distance (as 160-bit big-endian integers), nearest first, ties by lower index.
"""

from __future__ import annotations

import heapq
from typing import Any

from _fast._errors import (
    ID_LEN,
    check_k,
    check_target,
    ids_not_buffer,
    ids_not_contiguous,
    ids_wrong_length,
    items_not_list,
    items_wrong_length,
)

_from_bytes = int.from_bytes


def _ids_view(ids: Any) -> memoryview:
    """The raw bytes of ``ids`` as a 1-D unsigned-byte memoryview (no copy)."""
    try:
        mv = memoryview(ids)
    except TypeError:
        raise TypeError(ids_not_buffer(ids)) from None
    if not mv.c_contiguous:
        raise ValueError(ids_not_contiguous())
    if mv.nbytes % ID_LEN:
        raise ValueError(ids_wrong_length(mv.nbytes))
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def k_closest(target: bytes, ids: Any, k: int) -> list[int]:
    """Indices of the ``k`` ids in ``ids`` nearest ``target`` by XOR, nearest first."""
    check_target(target, "target")
    mv = _ids_view(ids)
    k = check_k(k)
    n = mv.nbytes // ID_LEN
    if k == 0 or n == 0:
        return []
    t = _from_bytes(target, "big")
    raw = mv.tobytes()
    dists = (
        (_from_bytes(raw[o:o + ID_LEN], "big") ^ t, i)
        for i, o in enumerate(range(0, n * ID_LEN, ID_LEN))
    )
    if k >= n:
        return [i for _, i in sorted(dists)]
    return [i for _, i in heapq.nsmallest(k, dists)]


def k_closest_items(target: bytes, ids: Any, k: int, items: list) -> list:
    """``[items[i] for i in k_closest(target, ids, k)]``; ``items`` is a list, one per id.

    The routing table keeps its contacts in such a list, parallel to the id buffer.
    """
    check_target(target, "target")
    mv = _ids_view(ids)
    if type(items) is not list:
        raise TypeError(items_not_list(items))
    if len(items) != mv.nbytes // ID_LEN:
        raise ValueError(items_wrong_length(len(items), mv.nbytes // ID_LEN))
    return [items[i] for i in k_closest(target, ids, k)]


def xor_distance_cmp(a: bytes, b: bytes, target: bytes) -> int:
    """-1 if ``a`` is nearer ``target`` than ``b``, 1 if farther, 0 if equal distance.

    Useful for crawl heaps that compare candidates one pair at a time without
    building 160-bit Python ints.
    """
    check_target(a, "a")
    check_target(b, "b")
    check_target(target, "target")
    t = _from_bytes(target, "big")
    da = _from_bytes(a, "big") ^ t
    db = _from_bytes(b, "big") ^ t
    return (da > db) - (da < db)
