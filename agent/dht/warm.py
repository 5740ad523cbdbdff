"""Warm lookups: per key, the storing nodes that answered its last lookup.

A cold provider lookup walks toward the key: ask alpha nodes from our own routing table,
learn closer ones from their answers, ask those, until the closest ``width`` nodes have
answered — two to four round trips on a network of thousands. A caller that looked the
same key up before already knows where that walk ends. ``WarmHints`` remembers, per key,
the nodes that answered closest (``Crawl.closest_answered``: within the diversity window,
so an eclipse attacker's crowd is never remembered), and the next lookup asks them all at
once first (``Crawl.warm``). When they are still the closest and agree about the key's
records, that is the whole lookup: one round trip. When one fails, or an answer names a
closer node, or their record counts disagree, the same lookup goes on as a crawl from
there, exactly as a cold one would.

A warm lookup never settles on less than the last one found: the hint also keeps which
workers' records that lookup returned (until each record's own expiry), and a warm start
whose merged answer lacks one of them goes on as a crawl (``ProviderLookup.find``). The
nodes asked first may agree and still all miss a record — an announce whose stores to them
were lost under load reaches them only at its next republish — while the crawl that made
the hint had merged it from nodes further out; a repeated lookup then lost a live worker.

A hint is only a cache of *whom to ask*: records still come from the answers and are
verified one by one (``record.decode_verified``), so a remembered node that turned
hostile can withhold records but never forge them, and the crawl's end condition (the
``width`` closest known nodes answered) is the same with or without hints. Bounded:
``size`` keys (least recently used dropped), each hint at most ``ttl`` seconds old.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kademlia.node import Node

HINT_KEYS = 256             # keys remembered
HINT_TTL = 300.0            # a hint older than this is not used (s)
HINT_NODES = 20             # nodes remembered per key (k)
HINT_RECORDS = 4096         # workers remembered per key (a larger answer: none, no check)


class WarmHints:
    """Bounded LRU: key -> (when, the nodes that answered its last lookup)."""

    def __init__(self, size: int = HINT_KEYS, ttl: float = HINT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._hints: OrderedDict[bytes, tuple[float, list[Node]]] = OrderedDict()
        # key -> ids the last lookup asked near the key (answered or still out): a node
        # named in a warm answer that is not among them is news (``Crawl.warm``)
        self._known: dict[bytes, frozenset[bytes]] = {}
        # key -> worker id -> expiry of its record in the last lookup's answer
        self._found: dict[bytes, dict[bytes, float]] = {}
        self.used = 0           # lookups that started from a hint
        self.one_round = 0      # ... and needed nobody but the hinted nodes
        self.short = 0          # ... whose hinted nodes agreed but missed a known worker

    def recall(self, key: bytes) -> list[Node]:
        """The nodes to ask first for ``key`` ([] when none, or too old)."""
        hit = self._hints.get(key)
        if hit is None:
            return []
        if self._clock() - hit[0] > self.ttl:
            del self._hints[key]
            self._known.pop(key, None)
            self._found.pop(key, None)
            return []
        self._hints.move_to_end(key)
        return list(hit[1])

    def known(self, key: bytes) -> frozenset[bytes]:
        """Ids the last lookup of ``key`` asked near it (see ``remember``)."""
        return self._known.get(key, frozenset()) if key in self._hints else frozenset()

    def counted(self, *, settled: bool, short: int) -> None:
        """A lookup started from a hint: whether it settled in one round, and how often
        its hinted nodes agreed but missed a known worker."""
        self.used += 1
        self.one_round += int(settled)
        self.short += short

    def found(self, key: bytes, now: float) -> frozenset[bytes]:
        """The workers whose records the last lookup of ``key`` returned and that are
        not expired at ``now`` (wall clock, as records' expiry): a warm answer must hold
        each of them (live or withdrawn) to settle."""
        if key not in self._hints:
            return frozenset()
        return frozenset(w for w, exp in self._found.get(key, {}).items() if exp > now)

    def remember(self, key: bytes, nodes: list[Node],
                 known: frozenset[bytes] = frozenset(),
                 found: dict[bytes, float] | None = None) -> None:
        """The nodes that answered this lookup of ``key``, closest first, the ids it
        asked near the key and the workers it found (id -> record expiry); an empty
        ``nodes`` forgets the key: nobody answered."""
        if not nodes:
            self._hints.pop(key, None)
            self._known.pop(key, None)
            self._found.pop(key, None)
            return
        self._hints[key] = (self._clock(), list(nodes[:HINT_NODES]))
        self._known[key] = known
        if found and len(found) <= HINT_RECORDS:
            self._found[key] = dict(found)
        else:
            self._found.pop(key, None)
        self._hints.move_to_end(key)
        while len(self._hints) > self.size:
            old, _ = self._hints.popitem(last=False)
            self._known.pop(old, None)
            self._found.pop(old, None)

    def forget_all(self) -> None:
        """Drop every hint (the network changed under them: a healed partition)."""
        self._hints.clear()
        self._known.clear()
        self._found.clear()

    def __len__(self) -> int:
        return len(self._hints)

    def stats(self) -> dict[str, int]:
        return {"warm_keys": len(self._hints), "warm_lookups": self.used,
                "warm_one_round": self.one_round, "warm_short": self.short}
