"""``DHTNode``: one node of the network — announces and finds signed worker records.

``DHTNode`` is its own class, not a ``kademlia.network.Server``: it holds kademlia's
pieces as members — a ``kademlia.node.Node`` for its id, the ``RMAProtocol`` (which holds
the routing table built on kademlia's buckets, and rpcudp's framing) — and exposes only
what this network does: listen/stop, bootstrap, announce/withdraw, find_providers,
service_counts, the views (peers, contacts, routing_snapshot, topology, stats), set_mode
and trust. kademlia's plain-value API (get/set) is not part of it. Against plain
kademlia's ``Server``:

* ``RMAProtocol`` (hardened wire, adaptive timeouts, provider RPCs) and a
  ``ProviderStorage`` (many signed records per key, an ``admit`` validator and an
  ``on_stored`` observer given to its constructor) instead of ``ForgetfulStorage``.
* ``listen(port, interface)`` has no default interface (kademlia silently binds 0.0.0.0).
* The table refresh keeps the configured interval (kademlia drops it after the first
  run) and republishes no stored values: workers republish their own records every
  ``republish_interval`` (the roles do).
* ``announce(record)`` stores the record at the k closest nodes of each of its keys
  (``WorkerRecord.keys()``: its services and one shard of the service index, see
  ``keys``): a ``StoreLookup`` sends the stores while it crawls (``store_lookup``). The
  closest set found for a key is cached for ``closest_ttl`` seconds, so a periodic
  re-announce is one round of ``announce`` RPCs; a cached set that loses a member, or
  grows stale, triggers a fresh store lookup (so republishing heals it).
* ``find_providers(service)`` runs a ``ProviderLookup`` until the ``lookup_width``
  closest live nodes have answered (default 6 of the k = 20 that hold each record) and
  returns verified records, merged by newest seq, without tombstones or expired ones,
  best first (warm: the nodes that answered a key's last lookup are asked first).
* Modes: ``"server"`` (in routing tables, stores records), ``"client"`` (queries and
  announces, never in others' tables, stores nothing). ``"auto"`` starts as a client
  until seeds ping it back (``component.probe_reachable``: ``set_mode``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from kademlia.node import Node

from agent.dht.crawling import NodeLookup
from agent.dht.identity import Identity
from agent.dht.keys import INDEX_KEYS
from agent.dht.liveness import DEAD_AFTER, DEAD_SPAN
from agent.dht.protocol import RMAProtocol, all_contacts
from agent.dht.provider_lookup import ProviderLookup
from agent.dht.record import ALL_SERVICES, WorkerRecord, service_key
from agent.dht.storage import ProviderStorage, is_stale
from agent.dht.store_lookup import StoreLookup, still_closest
from agent.dht.warm import WarmHints
from agent.interfaces import RoutingContact, Topology

log = logging.getLogger(__name__)

MODES = ("server", "client", "auto")


Admit = Callable[[WorkerRecord, float], str | None]


class DHTNode:
    """One DHT node (see module docstring). All methods must run on the node's loop.

    ``admit(record, now)``: a refusal reason for a record this node is asked to store, or
    None to admit it (closed networks); ``on_stored(record)``: observer of every record
    stored. Both go to the storage's constructor (ignored with ``storage``)."""

    def __init__(self, identity: Identity, *, ksize: int = 20, alpha: int = 3,
                 mode: str = "server", storage: ProviderStorage | None = None,
                 refresh_interval: float = 900.0, cull_interval: float = 30.0,
                 lookup_width: int | None = None, closest_ttl: float = 120.0,
                 trusted: tuple[Any, ...] | list[Any] | set[Any] = (),
                 admit: Admit | None = None,
                 on_stored: Callable[[WorkerRecord], None] | None = None,
                 rto_min: float = 0.2, rto_max: float = 2.0, rto_initial: float = 1.0,
                 dead_after: int = DEAD_AFTER, dead_span: float = DEAD_SPAN,
                 max_skew: float = 30.0, revive_interval: float = 5.0,
                 require_keyed_ids: bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ksize < 1 or alpha < 1:
            raise ValueError("ksize and alpha must be positive")
        if storage is None:
            storage = ProviderStorage(trusted=trusted, max_skew=max_skew, admit=admit,
                                      on_stored=on_stored)
        self.storage: ProviderStorage = storage
        self.identity = identity
        self.node = Node(identity.node_id)
        self.ksize = ksize
        self.alpha = alpha
        self.mode = "client" if mode == "auto" else mode
        self.requested_mode = mode
        self.refresh_interval = refresh_interval
        self.cull_interval = cull_interval
        self.lookup_width = lookup_width or min(ksize, 6)
        self.closest_ttl = closest_ttl
        self.max_skew = max_skew
        # contacts must prove their id is their key's hash (old agents cannot): opt-in
        # until every node of a network runs 0.3 (see liveness)
        self.require_keyed_ids = (os.environ.get("RMA_AGENT_DHT_NODE_IDS", "") == "strict"
                                  if require_keyed_ids is None else require_keyed_ids)
        self._proto_opts = dict(rto_min=rto_min, rto_max=rto_max, rto_initial=rto_initial,
                                dead_after=dead_after, dead_span=dead_span)
        self._closest: dict[bytes, tuple[float, list[Node]]] = {}
        self.hints = WarmHints()               # per key, whom to ask first (``warm``)
        self._bg: set[asyncio.Task[Any]] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.protocol: RMAProtocol | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.revive_interval = revive_interval
        self._last_remerge = -1e9
        self.store_wasted = 0       # early stores to nodes outside the final set
        self.token_prefetch = 0     # identify sent by announces for a write token
        self.closest_stale = 0      # cached closest sets found stale by a republish
        self.port: int | None = None
        self.interface: str | None = None
        self.started_at = time.time()
        self.lookups = 0
        self.announces = 0

    # ------------------------------------------------------------------ lifecycle
    async def listen(self, port: int, interface: str) -> None:
        """Bind the UDP socket on ``interface:port`` (port 0 picks a free one) and start
        the periodic table refresh, storage cull and revival of lost contacts."""
        loop = asyncio.get_running_loop()
        protocol = RMAProtocol(self.node, self.storage, self.ksize, mode=self.mode,
                               max_skew=self.max_skew, on_revived=self._on_revived,
                               prove_id=self.identity.node_id_proof,
                               require_keyed_ids=self.require_keyed_ids,
                               **self._proto_opts)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: protocol.engine, local_addr=(interface, port))
        self.transport, self.protocol = transport, protocol
        self.interface = interface
        self.port = transport.get_extra_info("sockname")[1]
        log.info("dht: node %s listening on udp %s:%d (%s mode)", self.node.id.hex(),
                 interface, self.port, self.mode)
        self._every("refresh", self.refresh_interval, self._refresh)
        self._every("cull", self.cull_interval, self._cull)
        self._every("revive", self.revive_interval, self._revive)

    def _every(self, name: str, interval: float, work: Callable[[], None]) -> None:
        """Run ``work`` every ``interval`` seconds until ``stop`` (one timer per name;
        an exception in ``work`` is logged and the timer kept)."""
        def tick() -> None:
            try:
                work()
            except Exception as exc:  # background work must never die silently
                log.warning("dht: %s failed: %r", name, exc)
            finally:
                self._timers[name] = asyncio.get_running_loop().call_later(interval, tick)

        self._timers[name] = asyncio.get_running_loop().call_later(interval, tick)

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self.transport is not None:
            self.transport.close()
        if self.protocol is not None:
            self.protocol.close()
        for t in list(self._bg):
            t.cancel()

    def trust(self, *senders: tuple[str, int] | str) -> None:
        """Exempt senders from the per-sender record bound of this node's storage: the
        coordinators (seeds), which republish the records of many workers from one
        address. Give exact ``(ip, port)`` pairs; a bare IP trusts every port on it."""
        for s in senders:
            self.storage.trusted.add(tuple(s) if isinstance(s, list | tuple) else s)

    def set_mode(self, mode: str) -> None:
        """Switch between "server" and "client" (after an auto-mode reachability check)."""
        if mode not in ("server", "client"):
            raise ValueError(f"mode must be 'server' or 'client', got {mode!r}")
        self.mode = mode
        if self.protocol is not None:
            self.protocol.mode = mode

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    def _refresh(self) -> None:
        self._spawn(self._refresh_table())

    async def _refresh_table(self) -> None:
        """Look up a random id in every bucket not touched for an hour, and our own id
        (keeps our neighbourhood fresh). No value republish: owners republish."""
        if self.protocol is None:
            return
        try:
            ids = [self.node.id, *self.protocol.get_refresh_ids()]
            await asyncio.gather(*(self._node_lookup(i) for i in ids[:16]))
        except Exception as exc:  # background work must never die silently in a loop
            log.warning("dht: table refresh failed: %r", exc)

    def _cull(self) -> None:
        n = self.storage.cull()
        if n:
            log.debug("dht: dropped %d expired records", n)
        if self.protocol is not None:
            self.protocol.housekeeping()
        now = time.monotonic()
        for k in [k for k, (t, _) in self._closest.items() if now - t > self.closest_ttl]:
            del self._closest[k]

    def _revive(self) -> None:
        """Ping a few removed contacts that are due (``ContactLiveness.revive``): after a
        partition heals, this is what first crosses between the halves again."""
        if self.protocol is not None:
            self.protocol.revive()

    def _on_revived(self, node: Node) -> None:
        """A contact lost earlier answers again (a healed partition, a restarted peer):
        look ourselves up through it so our neighbourhood re-merges with whatever it
        knows (at most once per 10 s), and forget cached closest sets, so the next
        republish of each key stores at the closest nodes of the merged network."""
        self._closest.clear()
        self.hints.forget_all()
        now = time.monotonic()
        if now - self._last_remerge < 10.0:
            return
        self._last_remerge = now
        self._spawn(self._node_lookup(self.node.id))

    # ------------------------------------------------------------------ joining
    def _start_peers(self, target: bytes) -> list[Node]:
        """The k nearest contacts with no unanswered failure (``live_neighbors``), or
        the nearest as they are when all failed lately (a node cut off for a while)."""
        assert self.protocol is not None
        live = self.protocol.liveness.live_neighbors(Node(target), self.ksize)
        return live or self.protocol.router.find_neighbors(Node(target), k=self.ksize)

    async def _node_lookup(self, target: bytes, width: int | None = None) -> list[Node]:
        assert self.protocol is not None
        peers = self._start_peers(target)
        if not peers:
            return []
        return await NodeLookup(self.protocol, target, peers, width=width or self.ksize,
                                alpha=self.alpha).find()

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Ask the seeds (IP literals) who they are, then look up our own id through them.
        Returns the number of contacts in the routing table afterwards."""
        assert self.protocol is not None, "listen() first"
        proto = self.protocol
        addrs = [(str(h), int(p)) for h, p in addrs
                 if not (p == self.port and h in (self.interface, "127.0.0.1", "::1"))]

        async def ping(addr: tuple[str, int]) -> Node | None:
            # the seed's id, proven by its key (``identify``; ping for old agents)
            nid = await proto.liveness.identify(addr, timeout=max(proto.rto(addr), 1.0))
            if nid is not None and nid != self.node.id:
                node = Node(nid, addr[0], addr[1])
                proto.welcome_if_new(node)
                return node
            return None

        seeds = [n for n in await asyncio.gather(*(ping(a) for a in addrs)) if n]
        if seeds:
            await self._node_lookup(self.node.id)
            await self._refresh_buckets()
        return self.peers()

    async def _refresh_buckets(self, limit: int = 8) -> None:
        """Look up a random id in each bucket but the one holding our own id (the
        self-lookup covered it), at most ``limit`` in parallel — Kademlia's join step.
        Without it a node that joined while many others did knows only what its
        self-lookup passed, and small groups of such nodes can end up knowing mostly
        each other: a lookup that converges into one finds the wrong closest nodes."""
        assert self.protocol is not None
        me = self.node.long_id
        ids = [random.randint(*b.range).to_bytes(20, "big")
               for b in self.protocol.router.buckets if not (b.range[0] <= me <= b.range[1])]
        random.shuffle(ids)
        await asyncio.gather(*(self._node_lookup(i) for i in ids[:limit]))

    # ------------------------------------------------------------------ records
    async def _cached_closest(self, key: bytes) -> list[Node] | None:
        """The cached closest set of ``key`` while it is fresh, no member failed lately
        and its closest member knows nobody closer (``still_closest``); else None."""
        hit = self._closest.get(key)
        if hit is None or time.monotonic() - hit[0] >= self.closest_ttl or any(
                map(self.protocol.is_suspect, [n.id for n in hit[1]])):  # a member failed
            return None
        stale = not await still_closest(self.protocol, key, hit[1])
        self.closest_stale += stale
        return None if stale else hit[1]

    async def _store_lookup(self, key: bytes, enc: bytes,
                            held: frozenset[bytes] = frozenset()) -> tuple[list[Node], int]:
        """Crawl for ``key``'s k closest and store on them as it goes (``StoreLookup``):
        the final set (cached for the next announce) and how many of it hold ``enc``."""
        assert self.protocol is not None
        peers = self._start_peers(key)
        if not peers:
            return [], 0
        crawl = StoreLookup(self.protocol, key, peers, width=self.ksize, alpha=self.alpha,
                            record=enc, held=held)
        nodes, stored = await crawl.store()
        self.store_wasted += crawl.wasted
        self.token_prefetch += len(crawl.prefetched)
        if nodes:
            self._closest[key] = (time.monotonic(), nodes)
        return nodes, stored

    def _store_locally(self, key: bytes, record: WorkerRecord, nodes: list[Node]) -> int:
        """Keep a copy when this server-mode node is itself among the k closest."""
        if self.mode != "server":
            return 0
        target = Node(key)
        if len(nodes) >= self.ksize:
            far = max(n.distance_to(target) for n in nodes)
            if self.node.distance_to(target) >= far:
                return 0
        ok = self.storage.put(key, record, sender=None, now=time.time()) in ("stored", "same")
        return 1 if ok else 0

    async def _announce_key(self, key: bytes, record: WorkerRecord) -> int:
        """One round of announces to the cached closest set; when there is none, or a
        member of it failed, a store lookup (whose stores overlap its crawl), skipping
        the members that already acknowledged."""
        assert self.protocol is not None
        enc = record.encode()
        nodes = await self._cached_closest(key)
        if nodes is None:
            nodes, stored = await self._store_lookup(key, enc)
        else:
            results = await asyncio.gather(
                *(self.protocol.call_announce(n, key, enc) for n in nodes))
            stored = sum(1 for ok, res in results if ok and res is True)
            if any(not ok for ok, _ in results):
                # a member of the cached set died: find the current k closest, fill in
                done = frozenset(n.id for n, (ok, res) in zip(nodes, results, strict=True)
                                 if ok and res is True)
                nodes, stored = await self._store_lookup(key, enc, held=done)
        return stored + self._store_locally(key, record, nodes)

    async def announce(self, record: WorkerRecord) -> int:
        """Store ``record`` at the k closest nodes of each of its keys; returns the
        number of successful stores (summed over keys, local copy included)."""
        record.verify(time.time(), self.max_skew)  # refuse to spread a bad record
        self.announces += 1
        counts = await asyncio.gather(*(self._announce_key(k, record) for k in record.keys()))
        return sum(counts)

    async def withdraw(self, tombstone: WorkerRecord) -> int:
        """Announce a withdrawn record (see ``WorkerRecord.tombstone``)."""
        if not tombstone.withdrawn:
            raise ValueError("withdraw() takes a tombstone (withdrawn=True)")
        return await self.announce(tombstone)

    def _provider_lookup(self, key: bytes, now: float) -> ProviderLookup:
        assert self.protocol is not None
        peers = self._start_peers(key)
        crawl = ProviderLookup(self.protocol, key, peers, width=self.lookup_width,
                               alpha=self.alpha, now=now, max_skew=self.max_skew,
                               max_width=self.ksize)
        crawl.warm(self.hints.recall(key), known=self.hints.known(key))  # see ``warm``
        crawl.expect = self.hints.found(key, now)
        for rec in self.storage.snapshot(key, now):
            crawl.merge(rec)
        return crawl

    async def _find_key(self, key: bytes, now: float) -> list[WorkerRecord]:
        """One key's provider lookup, warm when a hint is known (``warm``); the nodes that
        answered closest are remembered for the next one."""
        crawl = self._provider_lookup(key, now)
        warm = crawl.warmed
        recs = await crawl.find()
        if warm:
            self.hints.counted(settled=crawl.settled, short=crawl.unsettled)
        self.hints.remember(key, crawl.closest_answered(self.ksize), crawl.asked_near(
            2 * self.ksize), {r.worker_id: r.expires_at for r in recs})
        return recs

    async def find_providers(self, service: str, limit: int | None = None) -> list[WorkerRecord]:
        """Verified live records of ``service``'s workers, merged by newest seq over the
        closest nodes, best first (lowest utilisation, then freshest). ``ALL_SERVICES``
        reads every service-index shard (and the legacy "*" key of older workers)."""
        assert self.protocol is not None
        self.lookups += 1
        now = time.time()
        if service == ALL_SERVICES:
            keys = [*INDEX_KEYS, service_key(ALL_SERVICES)]
            merged: dict[bytes, WorkerRecord] = {}
            for part in await asyncio.gather(
                    *(self._find_key(k, now) for k in keys)):
                for r in part:
                    old = merged.get(r.worker_id)
                    if old is None or r.seq > old.seq:
                        merged[r.worker_id] = r
            recs = list(merged.values())
        else:
            recs = await self._find_key(service_key(service), now)
        recs.sort(key=lambda r: (r.load / r.capacity if r.capacity > 0 else float("inf"),
                                 -r.issued_at))
        return recs if limit is None else recs[:limit]

    async def service_counts(self) -> dict[str, int]:
        """Live workers per service over the whole network, from the service-index shards
        (see ``keys``): each shard's storing nodes answer with names and counts, so this
        costs ``INDEX_SHARDS`` small lookups however many workers there are. A shard whose
        counts did not fit one answer is read in full; workers of older agents, which
        announce under the legacy "*" key, are counted from its records."""
        assert self.protocol is not None
        now = time.time()
        legacy = service_key(ALL_SERVICES)

        async def shard(key: bytes) -> dict[str, int]:
            if key != legacy:
                crawl = self._provider_lookup(key, now)
                await crawl.run()
                if crawl.services_complete and crawl.answered:
                    counts = dict(crawl.services)
                    for svc, n in self.storage.service_counts(key, now).items():
                        counts[svc] = max(counts.get(svc, 0), n)  # a storing node itself
                    return counts
            out: dict[str, int] = {}
            for r in await self._provider_lookup(key, now).find():
                if is_stale(r, time.time()):
                    continue          # what lookups no longer offer is not counted
                for svc in r.services:
                    out[svc] = out.get(svc, 0) + 1
            return out

        total: dict[str, int] = {}
        for part in await asyncio.gather(*(shard(k) for k in [*INDEX_KEYS, legacy])):
            for svc, n in part.items():
                total[svc] = total.get(svc, 0) + n
        return total

    # ------------------------------------------------------------------ views
    def peers(self) -> int:
        return len(all_contacts(self.protocol.router)) if self.protocol is not None else 0

    def contacts(self) -> list[tuple[str, str, int]]:
        if self.protocol is None:
            return []
        return [(n.id.hex(), n.ip, n.port) for n in all_contacts(self.protocol.router)]

    def routing_snapshot(self) -> list[tuple[str, int]]:
        if self.protocol is None:
            return []
        return [(n.ip, n.port) for n in all_contacts(self.protocol.router)]

    def topology(self) -> Topology:
        """The routing table at a glance (the dashboard's ring): how many k-buckets,
        and each contact with the index of its bucket (empty before ``listen``)."""
        if self.protocol is None:
            return Topology(0, [])
        router = self.protocol.router
        return Topology(len(router.buckets), [
            RoutingContact(n.id, n.ip, n.port, router.get_bucket_for(n))
            for n in all_contacts(router)])

    def drop_thin_closest(self, keys: list[bytes], want: int) -> int:
        """Forget the cached closest sets of ``keys`` that hold fewer than ``want``
        nodes (cached while the network was smaller than it is now), so the next
        announce of those keys crawls afresh. Returns how many were dropped."""
        dropped = 0
        for key in keys:
            hit = self._closest.get(key)
            if hit is not None and len(hit[1]) < want:
                del self._closest[key]
                dropped += 1
        return dropped

    def stats(self) -> dict[str, Any]:
        st = self.storage.stats()
        out: dict[str, Any] = {
            "node_id": self.node.id.hex(), "mode": self.mode,
            "requested_mode": self.requested_mode, "port": self.port,
            "routing_table_size": self.peers(),
            "records_stored": st["records"],
            "tombstones_stored": st["tombstones"],
            "keys_stored": st["keys"],
            "store_refused": st["refused"],
            "lookups": self.lookups, "announces": self.announces,
            "closest_cache": len(self._closest), "closest_stale": self.closest_stale,
            "store_wasted": self.store_wasted, "token_prefetch": self.token_prefetch,
            **self.hints.stats(),
        }
        if self.protocol is not None:
            out.update(self.protocol.stats())
        return out
