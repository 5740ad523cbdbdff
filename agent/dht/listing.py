"""How a storing node lists the records of one key for a lookup that wants all of them
(the loops behind ``ProviderStorage.range_encoded`` and ``ProviderStorage.sketch``).

* **Ranges** — a lookup splits the worker-id space into ranges that each fit about one
  answer and asks for them in parallel, so its cost grows with the records returned, not
  with a page count.
* **Sketch** — ``SKETCH_BUCKETS`` pairs ``[count, xor]`` over the live workers of a key,
  bucketed by the first nibble of the worker id; ``xor`` folds the first 4 bytes of each
  id. A lookup compares a node's sketch with the records it merged and re-reads only the
  buckets that differ, so two storing nodes that saw different announces still add up
  to every worker.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any

SKETCH_BUCKETS = 16         # ranges of worker ids (by first nibble) in a key's sketch


def bucket_of(worker_id: bytes) -> int:
    return worker_id[0] >> 4


def xor_of(worker_id: bytes) -> int:
    return int.from_bytes(worker_id[:4], "big")


def range_of(order: list[bytes], entries: Mapping[bytes, Any], start: bytes, end: bytes,
             budget: int, now: float) -> tuple[list[bytes], bytes | None]:
    """Encoded records (entries with ``.record`` and ``.encoded``) of the workers with
    ``start <= id < end`` (``end == b""``: to the end), in the sorted ``order``, until
    their sizes (+3 bytes of framing each) would exceed ``budget``; and the id to
    continue from (``None`` when the range is exhausted)."""
    i = bisect.bisect_left(order, start)
    out: list[bytes] = []
    while i < len(order):
        wid = order[i]
        if end and wid >= end:
            return out, None
        e = entries.get(wid)
        i += 1
        if e is None or e.record.expires_at <= now:
            continue
        budget -= len(e.encoded) + 3
        if budget < 0:
            return out, wid if out else None
        out.append(e.encoded)
    return out, None


def sketch_of(worker_ids: Iterable[bytes]) -> list[list[int]]:
    """The ``[count, xor]`` pairs of the given (live) worker ids."""
    out = [[0, 0] for _ in range(SKETCH_BUCKETS)]
    for wid in worker_ids:
        b = out[bucket_of(wid)]
        b[0] += 1
        b[1] ^= xor_of(wid)
    return out
