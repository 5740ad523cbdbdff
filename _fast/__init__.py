"""Hot-path kernels: exact XOR k-closest and worker scoring.

Each kernel exists twice: a Cython extension (``_xor``, ``_score``) and a pure-Python
twin (``xor_py``, ``score_py``) with identical results and errors. The compiled one is
used unless ``RMA_AGENT_PURE=1`` is set or it cannot be imported (no compiler when the
package was built); then the agent still works, only slower, and says so once in the log
(logger ``rma_agent.fast``) and through ``IMPLEMENTATION`` / ``FALLBACK_REASON``, which
``/api/dht/stats`` reports.

Public API (see the twins' docstrings for the exact semantics):

* ``k_closest(target, ids, k) -> list[int]``
* ``k_closest_items(target, ids, k, items) -> list``: the same selection, returning
  ``items[i]`` (a list parallel to the ids) instead of ``i`` — no Python loop per result
* ``xor_distance_cmp(a, b, target) -> int``
* ``score_rank(load, capacity, gpu_score, age_s, latency_ms, region_match, healthy,
  weights, max_age_s, limit) -> list[int]`` where, for each row that is healthy and
  ``0 <= age_s <= max_age_s``::

      free  = (capacity - load) / capacity if capacity > 0 else 0.0, clamped to [0, 1]
      lat   = latency_ms / (latency_ms + 50.0) if latency_ms >= 0 else 0.5
      agef  = age_s / max_age_s if max_age_s > 0 else 0.0
      score = w_free*free + w_gpu*gpu_score + w_region*region_match
              - w_latency*lat - w_age*agef

  best score first, ties by lower index; rows with a NaN score are dropped.
* ``score_values(...same..., limit=None) -> list[tuple[int, float]]``: ``(index, score)``
  in the same order, for showing scores.

``pure`` and ``compiled`` (``None`` when unavailable) hold each implementation's
functions, so tests and benchmarks can run both side by side.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

from _fast import score_py as _score_py
from _fast import xor_py as _xor_py

log = logging.getLogger("rma_agent.fast")

pure = SimpleNamespace(
    name="python",
    k_closest=_xor_py.k_closest,
    k_closest_items=_xor_py.k_closest_items,
    xor_distance_cmp=_xor_py.xor_distance_cmp,
    score_rank=_score_py.score_rank,
    score_values=_score_py.score_values,
)

compiled: SimpleNamespace | None
COMPILED_ERROR: str | None
try:
    from _fast import _score as _score_c
    from _fast import _xor as _xor_c
except ImportError as exc:
    compiled = None
    COMPILED_ERROR = f"compiled kernels unavailable: {exc}"
else:
    compiled = SimpleNamespace(
        name="cython",
        k_closest=_xor_c.k_closest,
        k_closest_items=_xor_c.k_closest_items,
        xor_distance_cmp=_xor_c.xor_distance_cmp,
        score_rank=_score_c.score_rank,
        score_values=_score_c.score_values,
    )
    COMPILED_ERROR = None

FALLBACK_REASON: str | None
if os.environ.get("RMA_AGENT_PURE") == "1":
    _impl = pure
    FALLBACK_REASON = "RMA_AGENT_PURE=1"
elif compiled is None:
    _impl = pure
    FALLBACK_REASON = COMPILED_ERROR
else:
    _impl = compiled
    FALLBACK_REASON = None

IMPLEMENTATION: str = _impl.name
k_closest = _impl.k_closest
k_closest_items = _impl.k_closest_items
xor_distance_cmp = _impl.xor_distance_cmp
score_rank = _impl.score_rank
score_values = _impl.score_values

_warned = False


def warn_fallback_once() -> None:
    """Log (once per process) that the slow twins are in use because the build lacks them.

    Forcing the twins with ``RMA_AGENT_PURE=1`` is a choice, not a problem: not logged.
    """
    global _warned
    if _warned:
        return
    _warned = True
    if compiled is None and FALLBACK_REASON != "RMA_AGENT_PURE=1":
        log.warning("_fast: using the pure-Python kernels (slower): %s", FALLBACK_REASON)


def stats() -> dict[str, str | None]:
    """What ``/api/dht/stats`` shows about the kernels."""
    return {"kernels": IMPLEMENTATION, "kernels_fallback_reason": FALLBACK_REASON}


warn_fallback_once()

__all__ = [
    "COMPILED_ERROR",
    "FALLBACK_REASON",
    "IMPLEMENTATION",
    "compiled",
    "k_closest",
    "k_closest_items",
    "pure",
    "score_rank",
    "score_values",
    "stats",
    "warn_fallback_once",
    "xor_distance_cmp",
]
