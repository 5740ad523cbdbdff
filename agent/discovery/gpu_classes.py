"""GPU class table -> a score in [0, 1] that selection adds (weighted) to a worker's rank.

Why a table and not raw memory: what a caller cares about is throughput, and generations
differ more than memory does (a 24 GB L40S-class card is far faster than a 32 GB V100).
The default order, best first, is

    H200 > H100 > A100 > L40S > A10 > V100 > RTX 4090 > RTX 3090 > T4 > CPU

(``agent.config.DEFAULT_GPU_SCORES``). ``[discovery] gpu_scores`` in the config overrides
single entries (it is merged over the defaults, so a site can add "A10G" without
restating the whole table). A name the table does not know is scored by its memory:
``min(memory_gb / 100, 1) * 0.9`` — a large unknown card ranks high, but never above the
best known class, and an unknown card without memory information scores 0 like a CPU.

Names are matched loosely, because workers report what NVML or their operator wrote:
case and spacing are ignored, vendor words ("NVIDIA", "GeForce", "Tesla") are dropped, and
a known class followed by a variant suffix matches (``"NVIDIA A100-SXM4-80GB"`` -> A100),
but a longer model number does not (``"A10"`` never matches ``"A100"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from agent.config import DEFAULT_GPU_SCORES

UNKNOWN_MEMORY_CAP = 0.9  # an unknown card never outranks the best known class
_VENDOR_WORDS = re.compile(r"\b(NVIDIA|GEFORCE|TESLA|QUADRO)\b")
_SPACES = re.compile(r"[\s_]+")


def normalize(name: str) -> str:
    """Canonical form used for matching: upper case, vendor words dropped, single spaces."""
    up = _VENDOR_WORDS.sub(" ", name.upper())
    return _SPACES.sub(" ", up).strip()


def memory_score(memory_gb: float) -> float:
    """Score of a card whose name is unknown, from its memory alone."""
    try:
        mem = float(memory_gb)
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(mem) or mem <= 0:
        return 0.0
    return min(mem / 100.0, 1.0) * UNKNOWN_MEMORY_CAP


class GpuScorer:
    """Scores GPU names against a (possibly overridden) class table.

    Results are memoised per (name, memory) because a fleet has few distinct cards and
    scoring runs for every record a lookup brings back. The memo is bounded.
    """

    _MEMO_MAX = 4096

    def __init__(self, overrides: Mapping[str, float] | None = None) -> None:
        table: dict[str, float] = {}
        for source in (DEFAULT_GPU_SCORES, overrides or {}):
            for key, value in source.items():
                score = float(value)
                if not math.isfinite(score):
                    raise ValueError(f"gpu score for {key!r} is not a finite number")
                table[normalize(key)] = min(max(score, 0.0), 1.0)
        self.table = table
        # longest names first, so "A100" is tried before "A10"
        self._prefixes = sorted(table, key=len, reverse=True)
        self._memo: dict[tuple[str, float], float] = {}

    def classify(self, name: str) -> str | None:
        """The table entry ``name`` belongs to, or None when unknown."""
        norm = normalize(name or "")
        if not norm:
            return None
        if norm in self.table:
            return norm
        for key in self._prefixes:
            if norm.startswith(key):
                rest = norm[len(key):]
                # a variant suffix ("-SXM4-80GB", " PCIE") matches; "A10" must not eat "A100"
                if not rest or not rest[0].isalnum():
                    return key
        return None

    def score(self, name: str, memory_gb: float = 0.0) -> float:
        """Class score of a card in [0, 1]; memory decides when the name is unknown."""
        memo_key = (name, memory_gb)
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        cls = self.classify(name)
        value = self.table[cls] if cls is not None else memory_score(memory_gb)
        if len(self._memo) >= self._MEMO_MAX:
            self._memo.clear()
        self._memo[memo_key] = value
        return value

    def matches(self, name: str, wanted: str) -> bool:
        """Whether a worker's GPU ``name`` satisfies the ``gpu=`` filter ``wanted``.

        Both sides are classified, so ``gpu=a100`` finds ``"NVIDIA A100-SXM4-80GB"``; a
        filter naming an unknown class falls back to an exact normalised comparison.
        """
        want_cls = self.classify(wanted)
        have_cls = self.classify(name)
        if want_cls is not None:
            return have_cls == want_cls
        return normalize(name or "") == normalize(wanted)
