"""A lookup's answer: the deterministic ranking, rendered once and reused briefly.

At thousands of lookups a second on one service, re-scoring and re-rendering 50 workers
per call would be most of the cost, yet the ranking only changes when the latency
tracker does (reports, probes, bans — its ``version``), when a record reaches expiry or
staleness (``fresh_until``), or as ages drift. :class:`RankMemo` keeps each (service,
query) ranking for at most ``RANK_MEMO_S`` while none of that moved, so ages and scores
shown are at most that old; the random draw of the first slot happens on every call, on
top of the memoised order (``DiscoveryComponent.lookup``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.discovery.latency import LatencyTracker
from agent.discovery.select import TOP_RANDOM, CandidateSet, Query

RANK_MEMO_S = 0.1             # a rendered ranking is reused this long at most
RANK_MEMO_MAX = 256           # (service, query) rankings remembered, LRU

dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


@dataclass
class LookupResult:
    """One answer: the ranked workers (API JSON objects) and where they came from."""

    service: str
    source: str
    workers: list[dict[str, Any]]
    candidates: int = 0       # usable records before filters, limit and health
    fragments: list[bytes] | None = None   # ``workers`` already JSON-encoded, same order

    age_s: float | None = None   # source "stale": how old the last-known-good copy is

    def to_json(self) -> dict[str, Any]:
        out = {"service": self.service, "source": self.source, "workers": self.workers}
        if self.age_s is not None:
            out["age_s"] = round(self.age_s, 3)
        return out

    def body(self) -> bytes:
        """``to_json()`` serialised (joins the pre-encoded workers when available)."""
        if self.fragments is None or self.age_s is not None:
            return dumps(self.to_json()).encode()
        return b"".join((b'{"service": ', dumps(self.service).encode(), b', "source": ',
                         dumps(self.source).encode(), b', "workers": [',
                         b", ".join(self.fragments), b"]}"))


@dataclass
class RankedAnswer:
    """A rendered deterministic ranking of one candidate set for one query."""

    cs: CandidateSet                  # what it was computed from (entries get replaced)
    since: float
    until: float
    version: int
    views: list[dict[str, Any]]
    ids: list[bytes]                  # worker id of each view
    fragments: list[bytes]            # each view as JSON, so answers are joined, not dumped
    probe: list[tuple[bytes, str, bytes]]   # (id, endpoint, public key) of the top ones


class RankMemo:
    """(service, query) -> the last :class:`RankedAnswer`, bounded LRU."""

    def __init__(self) -> None:
        self._memo: OrderedDict[tuple[str, Query], RankedAnswer] = OrderedDict()

    def ranked(self, cs: CandidateSet, q: Query, now: float, tracker: LatencyTracker,
               weights: Sequence[float]) -> RankedAnswer:
        """The deterministic ranking of ``cs`` for ``q``, rendered; reused for up to
        ``RANK_MEMO_S`` while nothing that affects it changed."""
        tracker.current_bans(now)            # ends finished back-offs (bumps the version)
        key = (cs.service, q)
        memo = self._memo.get(key)
        if memo is not None and memo.cs is cs and memo.version == tracker.version \
                and memo.since <= now < memo.until:
            return memo
        pairs = cs.ranked(now, q, tracker, weights)
        views = [cs.view(i, now, score) for i, score in pairs]
        memo = RankedAnswer(
            cs=cs, since=now, until=min(now + RANK_MEMO_S, cs.fresh_until),
            version=tracker.version, views=views, ids=[cs.ids[i] for i, _ in pairs],
            fragments=[dumps(v).encode() for v in views],
            probe=[(cs.ids[i], cs.records[i].endpoint, cs.records[i].public_key)
                   for i, _ in pairs[:TOP_RANDOM]])
        self._memo[key] = memo
        self._memo.move_to_end(key)
        while len(self._memo) > RANK_MEMO_MAX:
            self._memo.popitem(last=False)
        return memo
