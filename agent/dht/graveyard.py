"""``Graveyard``: removed contacts remembered for revival pings — how a partition heals.

A contact removed for missing replies (``liveness``: the removal rule) is kept here,
bounded (``GRAVEYARD`` entries, ``GRAVE_TTL``). ``due()`` names the few that may be
pinged now, each on its own back-off (``REVIVE_MIN`` doubling to ``REVIVE_MAX``: how late
a heal can be noticed); the per-tick limit bounds the traffic. An empty graveyard costs
nothing.

**Heal mode.** The first contact that answers again is the sign of a heal (or of one
peer's restart): the rest of the graveyard is then most likely the other half of a
split, whose members are all reachable again. ``wake()`` makes every entry due at once
and raises the per-tick limit to ``HEAL_PER_TICK`` for ``HEAL_WINDOW`` seconds (at most
once per window), instead of ``REVIVE_PER_TICK`` entries every tick over the whole
graveyard: at N = 300 a node's graveyard held ~100 entries after a split — two pings per
5 s reached them all only after minutes, while the merged network's lookups skipped
everything not yet revived. A restarted peer's revival costs at most
``HEAL_PER_TICK x HEAL_WINDOW / tick`` extra pings (48 with the node's 5 s tick).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import Any

from kademlia.node import Node

GRAVEYARD = 256                     # removed contacts remembered for revival
GRAVE_TTL = 3600.0                  # ... for this long
REVIVE_MIN = 2.0                    # first revival ping this long after removal
REVIVE_MAX = 4.0                    # back-off cap between revival pings of one contact: a
                                    # healed partition is noticed within it (the per-tick
                                    # limit below is what bounds the traffic)
REVIVE_PER_TICK = 2                 # revival pings per ``due()`` call
HEAL_PER_TICK = 8                   # ... in heal mode (``wake``)
HEAL_WINDOW = 30.0                  # heal mode lasts this long, re-armed at most this often


class Graveyard:
    """Removed contacts and when each is next pinged (see module)."""

    def __init__(self, size: int = GRAVEYARD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self._clock = clock
        # node id -> [node, next ping at, back-off, buried at]
        self._entries: OrderedDict[bytes, list[Any]] = OrderedDict()
        self._heal_until = -1e9
        self.wakes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def bury(self, node: Node) -> None:
        if node.id in self._entries or len(node.id) != 20:
            return
        now = self._clock()
        self._entries[node.id] = [node, now + REVIVE_MIN, REVIVE_MIN, now]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def unbury(self, node_id: bytes) -> float | None:
        """Take ``node_id`` out; when it was buried (None if it was not)."""
        entry = self._entries.pop(node_id, None)
        return None if entry is None else entry[3]

    def due(self, busy: Container[bytes]) -> list[Node]:
        """Up to the tick's limit of entries due for a ping (not in ``busy``), each
        rescheduled on its back-off; expired entries are dropped."""
        now = self._clock()
        limit = HEAL_PER_TICK if now < self._heal_until else REVIVE_PER_TICK
        out: list[Node] = []
        for nid, entry in list(self._entries.items()):
            if len(out) >= limit:
                break
            node, at, backoff, buried = entry
            if now - buried > GRAVE_TTL:
                del self._entries[nid]
                continue
            if at > now or nid in busy:
                continue
            entry[2] = min(REVIVE_MAX, backoff * 2)
            entry[1] = now + entry[2]
            self._entries.move_to_end(nid)
            out.append(node)
        return out

    def wake(self) -> bool:
        """A buried contact answered: every entry due now, heal mode for
        ``HEAL_WINDOW`` (not re-armed within one). True if it was armed."""
        now = self._clock()
        if now < self._heal_until + HEAL_WINDOW:
            return False
        self._heal_until = now + HEAL_WINDOW
        self.wakes += 1
        for entry in self._entries.values():
            entry[1] = min(entry[1], now)
        return True
