"""Iterative lookups that replace kademlia's ``SpiderCrawl``.

kademlia's crawl works in lock-step rounds (a slow or dead peer stalls the round for the
full RPC timeout), keeps candidates in an O(n²) ``NodeHeap``, and its value crawl stops at
the first node holding a value. ``Crawl`` here is event-driven:

* up to ``alpha`` requests are active; whenever one completes the next closest
  unqueried candidate is asked at once (never waiting for the slowest of a "round"). A
  request slower than its peer's hedge delay (``hedge_delay``: three recent RTTs of the
  node, 3-100 ms; for the nodes of a warm start one and a half times that peer's own
  smoothed RTT when it is far, never beyond its RTO) is *hedged*: it stops counting against ``alpha`` and stops holding
  the ``width`` window, so the next candidate is asked, while a late answer is still used.
  A dead peer therefore costs a lookup about one hedge delay, not an RPC timeout (5 s in
  plain kademlia);
* **proximity neighbour selection**: among the candidates that may be asked next, those
  equally close to the target in Kademlia's sense (same XOR log-distance: the same bucket
  seen from the target) are asked lowest measured RTT first (``expected_rtt``), so each
  hop is short; the exact-distance order still decides when the lookup is done;
* **warm start** (``warm``): nodes that answered the last lookup of this key are asked at
  once, all together, before anything else; when they are still the closest and agree,
  the lookup ends after that one round trip, otherwise it goes on as a crawl;
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

``ProviderLookup`` (``provider_lookup``) uses it with ``find_providers`` and merges
signed records. ``NodeLookup`` uses ``find_node`` and returns the closest nodes that answered (for
announces and bootstrap).
"""

from __future__ import annotations

import asyncio
import bisect
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from agent.dht.diversity import DiversityPolicy
from agent.dht.protocol import parse_nodes

if TYPE_CHECKING:
    from agent.dht.protocol import RMAProtocol

NEW, INFLIGHT, ANSWERED, FAILED, HEDGED = 0, 1, 2, 3, 4
HEDGE_MIN = 0.003
HEDGE_MAX = 0.1
MAX_STEPS = 64              # queries per crawl beyond 4 x width: a bound, whatever peers say


class Crawl:
    """Generic iterative lookup toward ``target``; subclasses define the RPC and merge."""

    def __init__(self, protocol: RMAProtocol, target: bytes, peers: list[Node], *,
                 width: int, alpha: int, patient: bool = False) -> None:
        self.protocol = protocol
        # patient: do not end while a slow (hedged) request to a node closer than the
        # width-th answer is still out — a store set must be the closest nodes, not the
        # fastest (under load the closest ones were skipped, and lookups missed records).
        # Only until the request misses that peer's RTO, though (the engine sends it
        # again: ``retransmitting``, judged by its lag-aware timer): the peer is most
        # likely dead — after 30 % of the nodes died, patient lookups waited ~4 s for
        # each (RTO ceiling plus the retransmission)
        self.patient = patient
        self._sent_at: dict[bytes, float] = {}
        self._wake_patient: float | None = None
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
        self._first: list[bytes] = []
        self.warmed = 0                 # nodes asked first by ``warm``
        self.hinted: set[bytes] = set()  # every node ``warm`` was given
        self._launched: dict[bytes, float] = {}
        self._outstanding = 0
        # a contact with an unanswered failure stays in routing tables for seconds (see
        # liveness: removal needs several losses spread over time): do not start there,
        # unless nobody else is known
        live = [n for n in peers if not protocol.is_suspect(n.id)]
        for n in live or peers:
            self._add(n)

    def warm(self, nodes: list[Node], quorum: int | None = None,
             known: frozenset[bytes] = frozenset()) -> None:
        """Warm start from ``nodes`` (those that answered this key's last lookup, closest
        first): all become candidates, and the ``quorum`` (default ``alpha``) of the
        ``width`` closest with the lowest expected RTT are asked at once. The lookup ends as soon as those
        have all answered and agree (``_settled``: one round trip to the farthest of the
        nearest few storing nodes), else it goes on as a crawl, whose end condition is
        unchanged."""
        for n in nodes:
            self._add(n)
        self.hinted = {n.id for n in nodes} | known
        fresh = [n.id for n in nodes if self.state.get(n.id) == NEW]
        expected = self.protocol.expected_rtt

        def rtt(nid: bytes) -> float:
            node = self.nodes[nid]
            e = expected((node.ip, node.port))
            return float("inf") if e is None else e

        # of the ``width`` closest, the nearest by RTT (stable: the closest among equals)
        self._first = sorted(fresh[:self.width], key=rtt)[:quorum or self.alpha]
        self.warmed = len(self._first)

    def _warm_pending(self) -> bool:
        """The warm start may still settle: some of its nodes are still asked (not
        hedged) and none failed."""
        states = [self.state[nid] for nid in self._first]
        return INFLIGHT in states and FAILED not in states and HEDGED not in states

    def _settled(self) -> bool:
        """The warm-start nodes all answered and their answers agree (subclasses say
        what agreeing means): the lookup needs nobody else."""
        return False

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
        """The node-wide part of the hedge delay: three times the node's fast-moving RTT
        average (gain 1/2), within [3 ms, 100 ms]. Evaluated again at every event, so
        once a burst of load is over, a request already in flight is hedged on the new,
        shorter delay."""
        fast = self.protocol.fast_rtt
        if fast is None:
            return HEDGE_MAX
        return min(HEDGE_MAX, max(HEDGE_MIN, 3 * fast))

    def hedge_delay(self, node: Node, base: float) -> float:
        """How long to wait on ``node`` before also asking the next candidate: ``base``
        (``_hedge_delay``); for a node of a warm start, 1.5 x its own smoothed RTT when
        that is longer (it is known to be far, not slow: the warm start waits for all of
        them anyway), but never beyond its RTO. Other peers get ``base``: hedging early
        is what keeps a cold lookup short on a WAN (1.5 x the node's average RTT for
        every peer made cold lookups ~40 % slower in bench runs)."""
        if node.id not in self._first:
            return base
        addr = (node.ip, node.port)
        srtt = self.protocol.peer_srtt(addr)
        if srtt is None or 1.5 * srtt <= base:
            return base
        return min(1.5 * srtt, max(base, self.protocol.rto(addr)))

    def _pick(self, ready: list[bytes], n: int) -> list[bytes]:
        """Up to ``n`` of ``ready`` (askable candidates, closest first) to ask now:
        closest log-distance class first, lowest expected RTT first within a class
        (proximity neighbour selection; unknown peers rank as the node's average)."""
        if len(ready) <= n:
            return ready
        expected = self.protocol.expected_rtt
        nodes = self.nodes
        tlong = self.tlong

        def rank(item: tuple[int, bytes]) -> tuple[int, float, int]:
            i, nid = item
            node = nodes[nid]
            rtt = expected((node.ip, node.port))
            return ((node.long_id ^ tlong).bit_length(), 0.0 if rtt is None else rtt, i)

        return [nid for _i, nid in sorted(enumerate(ready), key=rank)[:n]]

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

    def _patience(self, nid: bytes, now: float) -> float:
        """When a patient crawl looks again at the hedged request to ``nid``: at its
        peer's RTO after it was sent, then every quarter RTO until the engine has sent
        it again (its timer fires late on a busy loop) or it is answered."""
        node = self.nodes[nid]
        rto = self.protocol.rto((node.ip, node.port))
        at = self._sent_at.get(nid, now) + rto
        return at if at > now else now + rto / 4

    def _scan(self, parallel: int, now: float = 0.0) -> tuple[int, int, list[bytes]]:
        """One pass over the closest ``width`` candidates (diversity window applied):
        how many answered, how many hedged requests are still out among them (for a
        patient crawl: those not retransmitted yet; when to look at them again is kept
        in ``_wake_patient``), and the unqueried ones that may be asked."""
        state = self.state
        seen = answered = pending_closer = 0
        window = _Window(self) if self._crowded else None
        ready: list[bytes] = []
        self._wake_patient = None
        for _dist, nid in self.order:
            st = state[nid]
            if st == HEDGED:
                if self.patient:
                    node = self.nodes[nid]
                    if self.protocol.retransmitting((node.ip, node.port)):
                        continue
                    until = self._patience(nid, now)
                    if self._wake_patient is None or until < self._wake_patient:
                        self._wake_patient = until
                pending_closer += 1
                continue
            if st == FAILED:
                continue
            if window is not None and not window.admit(nid):
                continue
            seen += 1
            if st == ANSWERED:
                answered += 1
            elif st == NEW:
                ready.append(nid)
            if seen >= self.width:
                break
        return answered, pending_closer, ready

    def _launch(self, nid: bytes, now: float,
                done: asyncio.Queue[tuple[Node | None, Any]]) -> None:
        self.state[nid] = INFLIGHT
        self._launched[nid] = now
        self._sent_at[nid] = now
        self._outstanding += 1
        self.queried += 1
        task = asyncio.get_running_loop().create_task(self._query(self.nodes[nid], done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hedge_due(self, now: float) -> dict[bytes, float]:
        """Hedge the active requests that are due (at most ``width`` hedged at a time:
        enough to step past every dead peer among the closest, yet under overload, every
        reply slow, hedging cannot multiply the traffic without bound); returns when each
        remaining active request is due."""
        base = self._hedge_delay()
        due = {nid: t0 + self.hedge_delay(self.nodes[nid], base)
               for nid, t0 in self._launched.items()}
        for nid in [n for n, t in due.items() if now >= t]:
            if self._outstanding - len(self._launched) >= self.width:
                break
            del self._launched[nid]
            del due[nid]
            self.state[nid] = HEDGED
            self.hedged += 1
        return due

    async def run(self) -> None:
        """Keep ``alpha`` requests active; a request slower than its hedge delay stops
        counting (the next candidate is asked) but its late answer is still used."""
        done: asyncio.Queue[tuple[Node | None, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # active (sent, unfinished, not hedged) -> sent at; sent and unfinished (hedged
        # ones included)
        self._launched: dict[bytes, float] = {}
        self._outstanding = 0
        warm = bool(self._first)
        for nid in self._first:            # warm start: all at once (see ``warm``)
            if self.state.get(nid) == NEW:
                self._launch(nid, loop.time(), done)
        tick: asyncio.TimerHandle | None = None
        try:
            while True:
                if warm and self._settled():
                    return
                now = loop.time()
                due = self._hedge_due(now)
                # converged (the last alpha answers brought nothing into the closest
                # ``width``): ask all remaining closest candidates at once, as the
                # Kademlia paper's final round does
                parallel = self.width if self._stall >= self.alpha else self.alpha
                answered, pending_closer, ready = self._scan(parallel, now)
                room = min(parallel - len(self._launched), self.max_steps - self.queried)
                if warm and self._warm_pending():
                    room = 0           # one round trip: nobody else while it may settle
                if room > 0 and ready:
                    picked = self._pick(ready, room)
                    for nid in picked:
                        self._launch(nid, now, done)
                    if picked:
                        due = self._hedge_due(now)
                if self._outstanding == 0 or (answered >= self.width
                                              and not (self.patient and pending_closer)):
                    return
                if tick is not None:
                    tick.cancel()
                    tick = None
                wake = [self._wake_patient] if self._wake_patient is not None else []
                if due and self._outstanding - len(self._launched) < self.width:
                    # wake up when the first active request is due for hedging (not
                    # while hedging is capped: a completion is what we wait for then)
                    wake.append(min(due.values()))
                if wake:
                    tick = loop.call_at(min(wake), done.put_nowait, (None, None))
                node, result = await done.get()
                while True:
                    if node is not None:
                        self._outstanding -= 1
                        self._launched.pop(node.id, None)
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

    def asked_near(self, k: int) -> frozenset[bytes]:
        """Ids of the ``k`` closest candidates that were asked and did not fail (answered,
        or an answer still out): what a warm start need not treat as news."""
        out = []
        for _d, nid in self.order:
            st = self.state[nid]
            if st in (ANSWERED, INFLIGHT, HEDGED):
                out.append(nid)
                if len(out) >= k:
                    break
        return frozenset(out)

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
