"""Iterative lookups that replace kademlia's ``SpiderCrawl``.

kademlia's crawl works in lock-step rounds (a slow or dead peer stalls the round for the
full RPC timeout), keeps candidates in an O(n²) ``NodeHeap``, and its value crawl stops at
the first node holding a value. ``Crawl`` here is event-driven:

* up to ``alpha`` requests are active; whenever one completes the next closest
  unqueried candidate is asked at once. A request slower than three recent RTTs
  (``_hedge_delay``, 3-100 ms) is *hedged*: it stops counting against
  ``alpha`` and stops holding the ``width`` window, so the next candidate is asked, while a
  late answer is still used. A dead peer therefore costs a lookup about one hedge delay
  (milliseconds on a LAN), not an RPC timeout (5 s in plain kademlia);
* candidates are ordered by exact XOR distance (Python ints, sorted insertion);
* once ``alpha`` answers in a row brought no new candidate into the closest ``width``,
  the remaining closest candidates are all asked at once (the paper's final round);
* peers that failed recently (``protocol.is_suspect``) are skipped — other nodes keep
  returning a dead contact until their own timeouts remove it;
* it ends when the ``width`` closest non-failed candidates have all answered, or when no
  candidate is left;
* **diversity** (the eclipse defence, ``diversity.DiversityPolicy``): the closest window
  counts at most ``window_per_ip`` candidates of one IP and ``window_per_prefix`` of one
  /24 (IPv6 /64); further ones are skipped — never asked, never counted, never returned.
  One host holding the 20 ids closest to a key (many ports, ground or chosen ids) then
  fills at most two places of the window, and the lookup goes on to the closest honest
  nodes, where announces (``NodeLookup``, same rule) stored the records.

``ProviderLookup`` uses it with ``find_providers`` and keeps going past the first node that
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
``NodeLookup`` uses ``find_node`` and returns the closest nodes that answered (for
announces and bootstrap).
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from agent.dht.diversity import DiversityPolicy
from agent.dht.protocol import MAX_NODES_IN_ANSWER, parse_nodes
from agent.dht.record import RecordError, WorkerRecord, decode_verified

if TYPE_CHECKING:
    from agent.dht.protocol import RMAProtocol

NEW, INFLIGHT, ANSWERED, FAILED, HEDGED = 0, 1, 2, 3, 4
MAX_RECORDS_PER_ANSWER = 64
MAX_FOLLOWUPS = 8
RANGE_RECORDS = 16          # records per id range asked with list_providers
RANGE_PARALLEL = 16         # list_providers requests in flight per lookup
MAX_LIST_CALLS = 1536       # list_providers requests per lookup (10,000 workers ~ 600)
MAX_RECONCILE = 32          # (node, id range) re-reads after comparing sketches
SKETCH_BUCKETS = 16
HEDGE_MIN = 0.003
HEDGE_MAX = 0.1
MAX_STEPS = 64              # queries per crawl beyond 4 x width: a bound, whatever peers say


def _valid_sketch(sk: Any) -> bool:
    return (isinstance(sk, list) and len(sk) == SKETCH_BUCKETS
            and all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                    and type(p[1]) is int for p in sk))


def _sketch_of(sk: list[Any]) -> list[list[int]]:
    return [[p[0], p[1]] for p in sk]


class Crawl:
    """Generic iterative lookup toward ``target``; subclasses define the RPC and merge."""

    def __init__(self, protocol: RMAProtocol, target: bytes, peers: list[Node], *,
                 width: int, alpha: int, patient: bool = False) -> None:
        self.protocol = protocol
        # patient: do not end while a slow (hedged) request to a node closer than the
        # width-th answer is still out — a store set must be the closest nodes, not the
        # fastest (under load the closest ones were skipped, and lookups missed records)
        self.patient = patient
        self.target = target
        self.tlong = int.from_bytes(target, "big")
        self.width = max(1, width)
        self.alpha = max(1, alpha)
        self.max_steps = MAX_STEPS + 4 * self.width
        self.state: dict[bytes, int] = {}
        self.nodes: dict[bytes, Node] = {}
        self.order: list[tuple[int, bytes]] = []
        self.queried = 0
        self.answered = 0
        self.failed = 0
        self.hedged = 0
        self._improved = False
        self._stall = 0
        self._self_id = protocol.source_node.id
        self._tasks: set[asyncio.Task[None]] = set()
        policy = getattr(getattr(protocol, "router", None), "diversity", None)
        if not isinstance(policy, DiversityPolicy):
            policy = DiversityPolicy.from_env()
        self.policy = policy
        # (host, prefix) of every candidate, computed once; None when the limits are off.
        # The window is only applied once some group has more candidates than its limit
        # (``_crowded``): an honest crawl (every candidate its own host) pays nothing.
        self._groups: dict[bytes, tuple[Any, Any]] | None = (
            {} if policy.window_per_ip or policy.window_per_prefix else None)
        self._host_n: dict[Any, int] = {}
        self._prefix_n: dict[Any, int] = {}
        self._crowded = False
        self.diversity_skipped: set[bytes] = set()
        for n in peers:
            self._add(n)

    def _add(self, node: Node) -> None:
        nid = node.id
        if nid in self.state or nid == self._self_id:
            return
        self.state[nid] = NEW
        self.nodes[nid] = node
        if self._groups is not None:
            host, prefix = self._groups[nid] = self.policy.groups(node.ip, node.port)
            h = self._host_n[host] = self._host_n.get(host, 0) + 1
            p = self._prefix_n[prefix] = self._prefix_n.get(prefix, 0) + 1
            pol = self.policy
            if (pol.window_per_ip and h > pol.window_per_ip) or (
                    pol.window_per_prefix and p > pol.window_per_prefix):
                self._crowded = True
        item = (node.long_id ^ self.tlong, nid)
        pos = bisect.bisect(self.order, item)
        self.order.insert(pos, item)
        if pos < self.width:
            self._improved = True

    def add_triples(self, triples: list[tuple[bytes, str, int]]) -> None:
        """New candidates from one answer: at most k of them (an honest node sends k; a
        liar's 64 made-up addresses would each cost a request), never suspects."""
        is_suspect = self.protocol.is_suspect
        for nid, ip, port in triples[:getattr(self.protocol, "ksize", 20)]:
            if nid in self.state or nid == self._self_id or is_suspect(nid):
                continue
            self._add(Node(nid, ip, port))

    async def _rpc(self, node: Node) -> tuple[bool, Any]:
        raise NotImplementedError

    def _on_answer(self, node: Node, data: Any) -> None:
        raise NotImplementedError

    async def _query(self, node: Node, done: asyncio.Queue[tuple[Node | None, Any]]) -> None:
        try:
            result = await self._rpc(node)
        except Exception:  # never let one peer's problem end the crawl
            result = (False, None)
        done.put_nowait((node, result))

    def _hedge_delay(self) -> float:
        """How long to wait on a peer before also asking the next candidate: three times
        the node's fast-moving RTT average (gain 1/2), within [3 ms, 100 ms]. Evaluated
        again at every event, so once a burst of load is over, a request already in
        flight is hedged on the new, shorter delay."""
        fast = self.protocol.fast_rtt
        if fast is None:
            return HEDGE_MAX
        return min(HEDGE_MAX, max(HEDGE_MIN, 3 * fast))

    def _finish(self, node: Node, result: tuple[bool, Any]) -> None:
        ok, data = result
        if ok:
            self.state[node.id] = ANSWERED
            self.answered += 1
            try:
                self._on_answer(node, data)
            except Exception:
                self.protocol.drops["bad_answer"] += 1
        else:
            self.state[node.id] = FAILED
            self.failed += 1

    async def run(self) -> None:
        """Keep ``alpha`` requests active; a request slower than the hedge delay stops
        counting (the next candidate is asked) but its late answer is still used."""
        done: asyncio.Queue[tuple[Node | None, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        state = self.state
        launched: dict[bytes, float] = {}  # active (sent, unfinished, not hedged) -> sent at
        outstanding = 0                    # sent, unfinished (hedged ones included)
        tick: asyncio.TimerHandle | None = None
        try:
            while True:
                now = loop.time()
                hedge = self._hedge_delay()
                # at most width hedged requests at a time: enough to step past every
                # dead peer among the closest, yet under overload (every reply slow)
                # hedging cannot multiply the traffic without bound
                for nid in [n for n, t0 in launched.items() if now - t0 >= hedge]:
                    if outstanding - len(launched) >= self.width:
                        break
                    del launched[nid]
                    state[nid] = HEDGED
                    self.hedged += 1
                # converged (the last alpha answers brought nothing into the closest
                # ``width``): ask all remaining closest candidates at once, as the
                # Kademlia paper's final round does
                parallel = self.width if self._stall >= self.alpha else self.alpha
                seen = 0
                answered = 0
                window = _Window(self) if self._crowded else None
                pending_closer = 0
                for _dist, nid in self.order:
                    st = state[nid]
                    if st == HEDGED:
                        pending_closer += 1
                        continue
                    if st == FAILED:
                        continue
                    if window is not None and not window.admit(nid):
                        continue
                    seen += 1
                    if st == ANSWERED:
                        answered += 1
                    elif (st == NEW and len(launched) < parallel
                          and self.queried < self.max_steps):
                        state[nid] = INFLIGHT
                        launched[nid] = now
                        outstanding += 1
                        self.queried += 1
                        task = loop.create_task(self._query(self.nodes[nid], done))  # type: ignore[arg-type]
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    if seen >= self.width:
                        break
                if outstanding == 0 or (answered >= self.width
                                        and not (self.patient and pending_closer)):
                    return
                if tick is not None:
                    tick.cancel()
                    tick = None
                if launched and outstanding - len(launched) < self.width:
                    # wake up when the oldest active request is due for hedging (not
                    # while hedging is capped: a completion is what we wait for then)
                    tick = loop.call_at(min(launched.values()) + hedge, done.put_nowait,
                                        (None, None))
                node, result = await done.get()
                while True:
                    if node is not None:
                        outstanding -= 1
                        launched.pop(node.id, None)
                        self._improved = False
                        self._finish(node, result)
                        if result[0]:
                            self._stall = 0 if self._improved else self._stall + 1
                    if done.empty():
                        break
                    node, result = done.get_nowait()
        finally:
            if tick is not None:
                tick.cancel()

    def closest_answered(self, k: int) -> list[Node]:
        """The ``k`` closest nodes that answered, within the diversity limits (a node
        asked before closer nodes of its host turned up is left out)."""
        out = []
        window = _Window(self) if self._crowded else None
        for _d, nid in self.order:
            if self.state[nid] == ANSWERED and (window is None or window.admit(nid)):
                out.append(self.nodes[nid])
                if len(out) >= k:
                    break
        return out


class _Window:
    """Per-group counts over one pass of the closest window (see module docstring)."""

    __slots__ = ("crawl", "hosts", "prefixes")

    def __init__(self, crawl: Crawl) -> None:
        self.crawl = crawl
        self.hosts: dict[Any, int] = {}
        self.prefixes: dict[Any, int] = {}

    def admit(self, nid: bytes) -> bool:
        crawl = self.crawl
        host, prefix = crawl._groups[nid]  # type: ignore[index]
        pol = crawl.policy
        h = self.hosts.get(host, 0)
        p = self.prefixes.get(prefix, 0)
        if (pol.window_per_ip and h >= pol.window_per_ip) or (
                pol.window_per_prefix and p >= pol.window_per_prefix):
            crawl.diversity_skipped.add(nid)
            return False
        self.hosts[host] = h + 1
        self.prefixes[prefix] = p + 1
        return True


class NodeLookup(Crawl):
    """The ``width`` (default k) closest live nodes to ``target`` (patient: see ``Crawl``)."""

    def __init__(self, protocol: RMAProtocol, target: bytes, peers: list[Node], *,
                 width: int, alpha: int) -> None:
        super().__init__(protocol, target, peers, width=width, alpha=alpha, patient=True)

    async def _rpc(self, node: Node) -> tuple[bool, Any]:
        return await self.protocol.call_find_node(node, Node(self.target))

    def _on_answer(self, node: Node, data: Any) -> None:
        self.add_triples(parse_nodes(data))

    async def find(self) -> list[Node]:
        await self.run()
        return self.closest_answered(self.width)


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
        while self._disagree() and self.width < self.max_width:
            self.width = min(self.max_width, self.width + self.alpha)
            self.widened += 1
            self._stall = self.alpha  # ask the new closest candidates at once
            await self.run()
        if self._holders:
            await self._read_all()
        else:
            await self._fetch_missing_pages()
        return [r for r in self.records.values()
                if not r.withdrawn and r.expires_at > self.now]
