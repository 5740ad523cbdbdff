"""Provider lookups: a ``crawling.Crawl`` that asks ``find_providers`` and merges signed
worker records.

``ProviderLookup`` keeps going past the first node that
has records: it merges the records of every answering node among the ``width`` closest
(newest ``seq`` per worker wins, tombstones included so a withdrawal beats a stale copy).
When a key holds more records than one answer carries, storing nodes add a *sketch* of
their set (per 1/16 of the worker-id space: count and xor of id prefixes). The lookup then
reads the whole set of the node holding the most records by id ranges sized to one
answer each (``list_providers``, in parallel), compares every other answering node's
sketch with what it merged, and re-reads from that node only the ranges that differ. So
it returns every live worker however the storing sets diverged (announces racing churn,
timeouts, stale closest-node caches), at a cost of about one datagram per ~20 records.
Old nodes (no sketch) get the previous behaviour: each node is asked for a different page
of its records; pages no answer covered are then fetched from the node holding the most
records (at most ``MAX_FOLLOWUPS``).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from agent.dht.crawling import ANSWERED, FAILED, Crawl
from agent.dht.protocol import MAX_NODES_IN_ANSWER, parse_nodes
from agent.dht.record import RecordError, WorkerRecord, decode_verified

if TYPE_CHECKING:
    from agent.dht.protocol import RMAProtocol

MAX_RECORDS_PER_ANSWER = 64
MAX_FOLLOWUPS = 8
RANGE_RECORDS = 16          # records per id range asked with list_providers
RANGE_PARALLEL = 16         # list_providers requests in flight per lookup
MAX_LIST_CALLS = 1536       # list_providers requests per lookup (10,000 workers ~ 600)
MAX_RECONCILE = 32          # (node, id range) re-reads after comparing sketches
SKETCH_BUCKETS = 16


def _valid_sketch(sk: Any) -> bool:
    return (isinstance(sk, list) and len(sk) == SKETCH_BUCKETS
            and all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                    and type(p[1]) is int for p in sk))


def _sketch_of(sk: list[Any]) -> list[list[int]]:
    return [[p[0], p[1]] for p in sk]


class ProviderLookup(Crawl):
    """Records for a service key, merged over the ``width`` closest answering nodes."""

    def __init__(self, protocol: RMAProtocol, target: bytes, peers: list[Node], *,
                 width: int, alpha: int, now: float | None = None,
                 max_skew: float = 30.0, max_width: int | None = None) -> None:
        super().__init__(protocol, target, peers, width=width, alpha=alpha)
        self.max_width = max(self.width, max_width or self.width)
        self.totals: dict[bytes, int] = {}
        self.widened = 0
        self.now = time.time() if now is None else now
        self.max_skew = max_skew
        self.records: dict[bytes, WorkerRecord] = {}
        self.seen: set[bytes] = set()
        self.rejected = 0
        self._page = random.getrandbits(16)
        self._asked: dict[bytes, int] = {}
        # (total, pages, distance rank, node, page asked) of each answer that had pages
        self._paged: list[tuple[int, int, int, Node, int]] = []
        # (total, distance rank, node, sketch) of each answer that carried a sketch
        self._holders: list[tuple[int, int, Node, list[Any]]] = []
        # service -> largest live count any answering node reported (index shards)
        self.services: dict[str, int] = {}
        self.services_complete = True
        self.followups = 0
        self.list_calls = 0
        self.settled = False        # a warm start's nodes answered and agreed
        # workers the last lookup of this key found, records not expired (``WarmHints``):
        # a warm start that settled without one of them goes on as a crawl
        self.expect: frozenset[bytes] = frozenset()
        self.unsettled = 0          # warm starts that settled short of ``expect``

    async def _rpc(self, node: Node) -> tuple[bool, Any]:
        # each queried node gets a different page of its non-best records (see storage)
        self._page = (self._page + 1) % 2**32
        self._asked[node.id] = self._page
        return await self.protocol.call_find_providers(node, self.target, self._page)

    def merge(self, rec: WorkerRecord) -> None:
        old = self.records.get(rec.worker_id)
        if old is None or rec.seq > old.seq:
            self.records[rec.worker_id] = rec

    def _on_answer(self, node: Node, data: Any) -> None:
        if not isinstance(data, dict):
            self.protocol.drops["bad_answer"] += 1
            return
        total, pages = data.get("total"), data.get("pages")
        if type(total) is int and total >= 0:
            self.totals[node.id] = total
        if (type(total) is int and type(pages) is int and 0 < pages <= 1_000_000
                and node.id in self._asked):
            self._paged.append((total, pages, -(node.long_id ^ self.tlong), node,
                                self._asked[node.id]))
            sk = data.get("sketch")
            if _valid_sketch(sk):
                self._holders.append((total, -(node.long_id ^ self.tlong), node, sk))
        svcs = data.get("services")
        if isinstance(svcs, list):
            for item in svcs[:1024]:
                if (isinstance(item, list) and len(item) == 2 and type(item[0]) is str
                        and type(item[1]) is int and item[1] >= 0):
                    self.services[item[0]] = max(self.services.get(item[0], 0), item[1])
            if data.get("services_complete") is not True:
                self.services_complete = False
        nodes = data.get("nodes")
        if isinstance(nodes, list):
            # most entries are already known: skip them before the full validation
            state = self.state
            fresh = [n for n in nodes[:MAX_NODES_IN_ANSWER]
                     if not (isinstance(n, list) and n and type(n[0]) is bytes
                             and n[0] in state)]
            if fresh:
                self.add_triples(parse_nodes(fresh))
        self._merge_records(data.get("records"))

    def _merge_records(self, recs: Any) -> None:
        if not isinstance(recs, list):
            return
        for b in recs[:MAX_RECORDS_PER_ANSWER]:
            if type(b) is not bytes or b in self.seen:
                continue
            self.seen.add(b)
            try:
                rec = decode_verified(b, self.now, self.max_skew)
            except RecordError:
                self.rejected += 1
                continue
            if not rec.serves(self.target):
                self.rejected += 1
                continue
            self.merge(rec)

    async def _fetch_missing_pages(self) -> None:
        """Ask the answered node holding the most records (the closest among equals) for
        the pages no answer covered yet, up to ``MAX_FOLLOWUPS`` in parallel."""
        if not self._paged:
            return
        _total, pages, _rank, node, _p = max(self._paged, key=lambda t: (t[0], t[2]))
        have = {p % pages for t, pg, _r, _n, p in self._paged if pg == pages}
        missing = [i for i in range(pages) if i not in have][:MAX_FOLLOWUPS]
        if not missing:
            return
        self.followups += len(missing)
        results = await asyncio.gather(
            *(self.protocol.call_find_providers(node, self.target, i) for i in missing))
        for ok, data in results:
            if ok and isinstance(data, dict):
                self._merge_records(data.get("records"))

    def _live(self) -> list[WorkerRecord]:
        return [r for r in self.records.values() if not r.withdrawn and r.expires_at > self.now]

    def my_sketch(self) -> list[list[int]]:
        """The sketch (see ``storage.sketch``) of the live records merged so far."""
        out = [[0, 0] for _ in range(SKETCH_BUCKETS)]
        for r in self._live():
            wid = r.worker_id
            b = out[wid[0] >> 4]
            b[0] += 1
            b[1] ^= int.from_bytes(wid[:4], "big")
        return out

    async def _list_range(self, nodes: list[Node], start: bytes, end: bytes,
                          sem: asyncio.Semaphore) -> None:
        """Read every record of ``[start, end)`` from the first of ``nodes`` that
        answers, following ``next`` until the range is done."""
        cursor = start
        for node in nodes:
            while self.list_calls < MAX_LIST_CALLS:
                self.list_calls += 1
                async with sem:
                    ok, data = await self.protocol.call_list_providers(
                        node, self.target, cursor, end)
                if not ok or not isinstance(data, dict):
                    break  # try the next holder for the rest of this range
                self._merge_records(data.get("records"))
                nxt = data.get("next")
                if not (type(nxt) is bytes and len(nxt) == 20 and nxt > cursor
                        and (not end or nxt < end)):
                    return
                cursor = nxt
            else:
                return

    async def _read_all(self) -> None:
        """Read the largest holders' set by id ranges, then re-read from each other
        holder the sketch buckets where it differs from what was merged."""
        holders = sorted(self._holders, key=lambda t: (t[0], t[1]), reverse=True)
        sem = asyncio.Semaphore(RANGE_PARALLEL)
        if _sketch_of(holders[0][3]) != self.my_sketch():
            total = holders[0][0]
            parts = max(1, min(4096, -(-total // RANGE_RECORDS)))
            cuts = [b""] + [((i << 32) // parts).to_bytes(4, "big") for i in range(1, parts)]
            # the ranges are spread over the holders whose sets are (nearly) complete, so
            # many concurrent lookups of one service do not all queue at the one node
            # closest to the key; each range falls back to the next holders in turn
            full = [h[2] for h in holders if h[0] * 10 >= total * 9][:6]
            rest = [h[2] for h in holders if h[2] not in full][:2]
            pool = full + rest
            first = random.randrange(len(full))
            await asyncio.gather(*(
                self._list_range(pool[(first + i) % len(full):] + pool[:(first + i) % len(full)],
                                 cuts[i], cuts[i + 1] if i + 1 < parts else b"", sem)
                for i in range(parts)))
        mine = self.my_sketch()
        jobs = []
        for _total, _rank, node, sk in holders:
            for b, pair in enumerate(_sketch_of(sk)):
                if pair != mine[b] and len(jobs) < MAX_RECONCILE:
                    start = b"" if b == 0 else bytes([b << 4])
                    end = b"" if b == SKETCH_BUCKETS - 1 else bytes([(b + 1) << 4])
                    jobs.append(self._list_range([node], start, end, sem))
        if jobs:
            self.followups += len(jobs)
            await asyncio.gather(*jobs)

    def _settled(self) -> bool:
        """Warm start (``Crawl.warm``): every node asked first answered, and they agree —
        the same number of live records and, where sent, the same sketch (see
        ``_read_all``). Their records are merged (verified one by one) like any answer's;
        one that failed or differs sends the lookup on as a crawl."""
        first = self._first
        state = self.state
        if not first or any(state[nid] != ANSWERED for nid in first):
            return False
        if len({self.totals.get(nid, -1) for nid in first}) != 1:
            return False
        # the network changed under the hint (a node that joined, a healed partition):
        # an answer named a node closer to the key than the farthest one asked that was
        # not among those that answered last time — ask it, as a crawl would
        far = max(self.nodes[nid].long_id ^ self.tlong for nid in first)
        for dist, nid in self.order:
            if dist >= far:
                break
            if nid not in self.hinted and state[nid] != FAILED:
                return False
        sketches = {nid: sk for _t, _r, node, sk in self._holders
                    for nid in (node.id,) if nid in first}
        if sketches and (len(sketches) != len(first)
                         or any(_sketch_of(sk) != _sketch_of(next(iter(sketches.values())))
                                for sk in sketches.values())):
            return False
        self.settled = True
        return True

    def _disagree(self) -> bool:
        """The closest answering nodes hold different numbers of live records."""
        ts = {self.totals.get(n.id, -1) for n in self.closest_answered(self.width)}
        return len(ts) > 1

    async def find(self) -> list[WorkerRecord]:
        """Merged, live (not withdrawn, not expired) records.

        While the ``width`` closest answering nodes disagree about how many records the
        key has (storing sets diverged: announces under load, churn, a healed split), the
        crawl widens by ``alpha`` up to ``max_width`` (k): the records held only further
        out are then merged too. A consistent key costs nothing extra."""
        await self.run()
        await self._widen_and_read()
        if self.settled and self._short():
            # the nodes asked first agreed, but a worker the last lookup found is in
            # none of their answers (see agent.dht.warm): go on as a crawl
            self.settled = False
            self.unsettled += 1
            self._first = []
            await self.run()
            await self._widen_and_read()
        # still short: the closest all miss it (their stores were lost), the nodes
        # further out hold it — widen, as for answers that disagree
        while self._short() and self.width < self.max_width:
            self._widen()
            await self.run()
            await self._widen_and_read()
        return [r for r in self.records.values()
                if not r.withdrawn and r.expires_at > self.now]

    def _short(self) -> bool:
        """A worker the last lookup of this key found (record not expired) is in no
        answer yet."""
        return bool(self.expect) and not self.expect <= self.records.keys()

    def _widen(self) -> None:
        self.width = min(self.max_width, self.width + self.alpha)
        self.widened += 1
        self._stall = self.alpha  # ask the new closest candidates at once

    async def _widen_and_read(self) -> None:
        """Widen while the closest disagree (see :meth:`find`), then read every page."""
        while not self.settled and self._disagree() and self.width < self.max_width:
            self._widen()
            await self.run()
        if self._holders:
            await self._read_all()
        else:
            await self._fetch_missing_pages()
