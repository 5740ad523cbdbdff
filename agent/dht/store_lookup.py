"""``StoreLookup``: an announce's node lookup whose stores go out while it runs.

Why: an announce used to find the k closest nodes first (a ``NodeLookup`` until the
slowest of them answered) and only then send its ``announce`` RPCs, so the farthest
storing node cost two full round trips after the crawl had reached it — on a WAN a
first announce took ~6 median RTTs (``bench/announce.py``), against issue 16's 3. Here
a store goes out as soon as the lookup has a reason to believe the node is a storing
node:

* **answered**: a node that answered its ``find_node`` and is, with its answer's nodes
  added, among the ``width`` closest candidates that have not failed (so fewer than k
  live-looking nodes are known closer to the key) is sent the record at once;
* **final round**: once the crawl has converged (``alpha`` answers in a row brought
  nothing closer: the paper's final round, where every remaining closest candidate is
  asked at once), a candidate asked then that is among those ``width`` closest is sent
  the record together with its ``find_node``: the store's round trip overlaps the
  question's. (A node we never talked to answers that first store with a write-token
  challenge, and ``CallQueue`` repeats it with the token: still one round trip less
  than asking, then storing, then repeating — measured in ``bench/announce.py``.)

What stays honest: ``store()`` returns the lookup's final closest set (the k closest
that answered, as ``NodeLookup.find``) and counts only acknowledgements from members of
that set; a node stored early that a closer late answer pushed out of the set counts
nothing, and a member of the final set that was not stored yet (found late, or freed by
a closer node that failed) is sent the record after the crawl. Stores beyond the final
set are bounded: at most ``width`` of them per lookup (``max_extra``), and none while the
diversity window is in force (``crawling``: a crowded host would decide the early set).

**Tokens fetched ahead** (``token_prefetch``): a store to a node that never gave us a
write token draws a challenge and is repeated — one round trip more after the crawl
reached the node (34 of 40 stores of a fresh joiner, ``bench/announce.py``). So each
candidate that enters the window of the ``width`` closest not-failed candidates (or is
asked while in it) and whose token we lack is sent an ``identify`` (``fetch_token``),
whose answer carries our token, beside its ``find_node``: once per node, at most
``width + max_extra`` per lookup and ``prefetch_inflight`` at a time. The store never
waits for it beyond ``HOLD`` (0.5) of the node's RTT: the ``find_node`` answer and the
``identify`` answer sent beside it arrive jitter apart, so a store is held only for a
token already due within that margin (``_hold``); an old agent (no ``identify``) or a
lost answer leaves the store on the challenge path, as before, at most that margin
later. No wire change: ``identify`` answers carry the token already.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from agent.dht.crawling import ANSWERED, FAILED, NodeLookup
from agent.dht.protocol import parse_nodes

if TYPE_CHECKING:
    from agent.dht.protocol import RMAProtocol


DUE = 1.25      # an identify's answer is due this many of the node's RTTs after sending
HOLD = 0.5      # a store waits for a due token at most this many RTTs (see ``_hold``)


def _consume(task: asyncio.Task[Any]) -> None:
    """A store outside the final set ends on its own; its outcome counts nothing."""
    if not task.cancelled():
        task.exception()


class StoreLookup(NodeLookup):
    """Find the ``width`` closest live nodes to ``target`` and store ``record`` on them,
    overlapping the stores with the lookup (see module). ``held``: ids that already
    acknowledged this record (a cached closest set's members), never sent it again and
    counted when they are in the final set."""

    def __init__(self, protocol: RMAProtocol, target: bytes, peers: list[Node], *,
                 width: int, alpha: int, record: bytes,
                 held: frozenset[bytes] = frozenset(), max_extra: int | None = None) -> None:
        super().__init__(protocol, target, peers, width=width, alpha=alpha)
        self.record = record
        self.held = held
        self.max_extra = self.width if max_extra is None else max_extra
        self.stores: dict[bytes, asyncio.Task[tuple[bool, Any]]] = {}
        self.early = 0              # stores sent while the crawl ran
        self.wasted = 0             # of those, to nodes outside the final set
        self.prefetched: set[bytes] = set()     # ids sent an identify for their token
        self.prefetch_inflight = max(self.alpha, self.width // 2)
        self._fetching: set[asyncio.Task[bool]] = set()
        self._fetch_of: dict[bytes, tuple[float, asyncio.Task[bool]]] = {}  # id -> (sent, task)

    def _in_window(self, nid: bytes) -> bool:
        """``nid`` is among the ``width`` closest candidates that have not failed."""
        seen = 0
        state = self.state
        for _d, other in self.order:
            if other == nid:
                return state[nid] != FAILED
            if state[other] != FAILED:
                seen += 1
                if seen >= self.width:
                    return False
        return False

    def _prefetch_window(self) -> None:
        """Fetch the token of every candidate in the window (see module) that has none,
        within the bounds; never awaited."""
        if self._crowded:
            return
        seen = 0
        state = self.state
        budget = self.width + self.max_extra
        for _d, nid in self.order:
            if state[nid] == FAILED:
                continue
            seen += 1
            if seen > self.width:
                return
            if nid in self.prefetched or nid in self.held or nid in self.stores:
                continue
            if len(self.prefetched) >= budget or len(self._fetching) >= self.prefetch_inflight:
                return
            node = self.nodes[nid]
            if self.protocol.holds_token(node):
                continue
            self.prefetched.add(nid)
            loop = asyncio.get_running_loop()
            task = loop.create_task(self.protocol.fetch_token(node))
            self._fetching.add(task)
            self._fetch_of[nid] = (loop.time(), task)
            task.add_done_callback(self._fetched)

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._fetching.discard(task)
        _consume(task)

    def _store(self, nid: bytes) -> None:
        if nid in self.stores or nid in self.held:
            return
        node = self.nodes[nid]
        loop = asyncio.get_running_loop()
        hold = self._hold(nid, loop.time())
        self.stores[nid] = loop.create_task(
            self.protocol.call_announce(node, self.target, self.record) if hold is None
            else self._store_after(node, *hold))

    def _hold(self, nid: bytes, now: float) -> tuple[asyncio.Task[bool], float] | None:
        """A store whose token is on its way: (the fetch, how long to wait for it at
        most). Only a fetch due within ``HOLD`` of the node's RTT is waited for (a
        ``find_node`` answer and the ``identify`` answer sent beside it arrive jitter
        apart; waiting longer would cost more than the challenge's round trip)."""
        hit = self._fetch_of.get(nid)
        if hit is None or hit[1].done():
            return None
        rtt = self.protocol.expected_rtt((self.nodes[nid].ip, self.nodes[nid].port))
        if not rtt:
            return None
        left = hit[0] + DUE * rtt - now
        return (hit[1], left) if 0 < left <= HOLD * rtt else None

    async def _store_after(self, node: Node, fetch: asyncio.Task[bool],
                           wait: float) -> tuple[bool, Any]:
        """Store once ``fetch`` brought the token, or after ``wait`` (an old agent never
        answers it: its store then takes the challenge path)."""
        await asyncio.wait({fetch}, timeout=wait)
        return await self.protocol.call_announce(node, self.target, self.record)

    def _store_early(self, nid: bytes) -> None:
        """Store now if the rule allows (see module) and the extra budget is not spent:
        at most ``width + max_extra`` stores can go out before the crawl ends."""
        if self._crowded or nid in self.stores or nid in self.held:
            return
        if len(self.stores) >= self.width + self.max_extra or not self._in_window(nid):
            return
        self.early += 1
        self._store(nid)

    def _launch(self, nid: bytes, now: float,
                done: asyncio.Queue[tuple[Node | None, Any]]) -> None:
        super()._launch(nid, now, done)
        self._prefetch_window()
        if self._stall >= self.alpha:          # the final round (see ``Crawl.run``)
            self._store_early(nid)

    def _finish(self, node: Node, result: tuple[bool, Any]) -> None:
        super()._finish(node, result)
        if self.state.get(node.id) == ANSWERED:
            self._store_early(node.id)
        self._prefetch_window()

    async def store(self) -> tuple[list[Node], int]:
        """Run the lookup, store on every member of the final closest set not stored
        yet, and wait for the set's answers: (the set, how many of it hold the record —
        acknowledged now or ``held`` before)."""
        await self.run()
        final = self.closest_answered(self.width)
        for n in final:
            self._store(n.id)
        ids = {n.id for n in final}
        mine = [self.stores[n.id] for n in final if n.id in self.stores]
        for nid, task in self.stores.items():
            if nid not in ids:
                self.wasted += 1
                task.add_done_callback(_consume)
        results = await asyncio.gather(*mine)
        acked = sum(1 for ok, res in results if ok and res is True)
        return final, acked + sum(1 for n in final if n.id in self.held)


async def still_closest(protocol: RMAProtocol, key: bytes, nodes: list[Node]) -> bool:
    """One ``find_node`` to the closest member of a cached closest set: False if it
    knows a node closer to ``key`` than the set's farthest member (the network changed
    under the cache: a healed partition, new nodes), so the caller crawls afresh. One
    RPC per key per republish instead of a crawl."""
    if not nodes:
        return False
    target = Node(key)
    far = max(n.distance_to(target) for n in nodes)
    have = {n.id for n in nodes}
    me = protocol.source_node.id
    ok, res = await protocol.call_find_node(nodes[0], target)
    if not ok:
        return True  # the announce itself finds out whether members died
    return not any(nid not in have and nid != me
                   and (int.from_bytes(nid, "big") ^ target.long_id) < far
                   for nid, _ip, _port in parse_nodes(res))
