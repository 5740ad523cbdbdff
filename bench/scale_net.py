"""The network under ``bench/scale.py``: counted sockets, the coordinators' stand-in, and
the two implementations (the agent's ``DHTNode`` and plain ``kademlia``) behind one face.

Why a separate module: ``scale.py`` holds the command line and the report, and
``scale_phases.py`` the scenario; this one holds what both implementations are measured
through, so that the same counting (every datagram at the sender) applies to both.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import os
import random
import time
from typing import Any

from agent.dht.identity import Identity
from agent.dht.record import RecordError, WorkerRecord


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no samples."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def address(i: int) -> str:
    """Node i's own loopback address: 127.x.y.z (y, z in 1..250)."""
    return f"127.{1 + i // 62500}.{1 + (i // 250) % 250}.{1 + i % 250}"


@functools.lru_cache(maxsize=1 << 16)
def index_of(ip: str) -> int:
    """The node index behind ``address(i)`` (its inverse); -1 for any other address.
    Cached: every datagram under ``--wan`` asks it for its destination."""
    try:
        _, x, y, z = (int(p) for p in ip.split("."))
    except ValueError:
        return -1
    return (x - 1) * 62500 + (y - 1) * 250 + (z - 1)


class DelayLine:
    """Datagrams held until their due time, one timer per millisecond that has any
    (not one per datagram): under ``--wan`` a shard sends thousands of datagrams a
    second, each of which would otherwise cost its own timer handle. Due times are
    rounded up to the next millisecond (the event loop's clock is read to about one)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots: dict[int, list[tuple[Any, bytes, Any]]] = {}

    def hold(self, delay: float, transport: Any, data: bytes, addr: Any) -> None:
        slot = math.ceil((self._loop.time() + delay) * 1000)
        held = self._slots.get(slot)
        if held is None:
            held = self._slots[slot] = []
            self._loop.call_at(slot / 1000, self._release, slot)
        held.append((transport, data, addr))

    def _release(self, slot: int) -> None:
        for transport, data, addr in self._slots.pop(slot, ()):
            if transport.is_closing():
                continue        # the node stopped while the datagram was on its way
            try:
                transport.sendto(data, addr)
            except OSError:
                pass


class World:
    """Counts every datagram sent and every table refresh, drops datagrams crossing a
    partition, and (``--wan``) delays or loses every datagram as ``bench/wan.py`` says."""

    def __init__(self, wan: Any = None) -> None:
        self.wan = wan                      # bench.wan.Wan, or None: loopback as it is
        self.datagrams = 0
        self.bytes = 0
        self.dropped = 0
        self.refreshes = 0                  # table refresh rounds started, all nodes
        self.refresh_override: float | None = None  # --refresh-interval, in the rests
        self.side: dict[str, int] = {}      # ip -> side while partitioned
        self.split = False
        self._line: DelayLine | None = None

    @property
    def line(self) -> DelayLine:
        """The process's delay line (``--wan``), made on the running loop."""
        if self._line is None:
            self._line = DelayLine()
        return self._line

    def snapshot(self) -> tuple[int, int]:
        return self.datagrams, self.bytes


class Tap:
    """Stands in for a node's UDP transport: counts, drops across a partition, and under
    ``--wan`` hands each datagram to the socket after the pair's one-way delay (the
    world's ``DelayLine``, on the event loop's timers: nothing sleeps) or loses it. The delay covers the
    whole path, so a request and its reply are each delayed once, by their sender."""

    def __init__(self, transport: Any, ip: str, world: World) -> None:
        self._t = transport
        self._ip = ip
        self._i = index_of(ip)
        self._w = world

    def sendto(self, data: bytes, addr: Any = None) -> None:
        w = self._w
        if w.split and w.side.get(self._ip) != w.side.get(addr[0]):
            w.dropped += 1
            return
        w.datagrams += 1
        w.bytes += len(data)
        if w.wan is None:
            self._t.sendto(data, addr)
            return
        dst = index_of(addr[0])
        delay = w.wan.delay(self._i, dst) if dst >= 0 else 0.0
        if delay is not None:
            w.line.hold(delay, self._t, data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def count_refreshes(node: Any, world: World) -> None:
    """Wrap kademlia's ``node.refresh_table`` (before ``listen``) so each refresh round is
    counted. It reschedules through the attribute, so every round passes here; while
    ``world.refresh_override`` is set, rounds are rescheduled with that period."""
    inner = node.refresh_table

    def refresh_table(*args: Any) -> None:
        world.refreshes += 1
        if world.refresh_override is None:
            inner(*args)
        else:
            inner(world.refresh_override)

    node.refresh_table = refresh_table


class Coordinator:
    """A real HTTP endpoint standing for the coordinators; counts what reaches it."""

    def __init__(self) -> None:
        self.registrations = 0
        self.registry_reads = 0
        self.port = 0
        self._runner: Any = None
        self._session: Any = None

    async def start(self) -> None:
        from aiohttp import ClientSession, web

        async def register(request: web.Request) -> web.Response:
            self.registrations += 1
            await request.read()
            return web.json_response({"stored": 1})

        async def registry(request: web.Request) -> web.Response:
            self.registry_reads += 1
            return web.json_response({"records": []})

        app = web.Application()
        app.router.add_post("/api/services/register", register)
        app.router.add_get("/api/registry/{service}", registry)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._session = ClientSession()

    async def register(self, body: bytes) -> None:
        async with self._session.post(f"http://127.0.0.1:{self.port}/api/services/register",
                                      data=body) as r:
            await r.read()

    async def registry(self, service: str) -> None:
        async with self._session.get(f"http://127.0.0.1:{self.port}/api/registry/{service}") as r:
            await r.read()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def kademlia_set(s: Any, key: str, value: bytes) -> int:
    """kademlia's own ``Server.set`` / ``set_digest``, step for step, except that it
    returns how many nodes stored the value (``set`` says only whether one did)."""
    from kademlia.crawling import NodeSpiderCrawl
    from kademlia.node import Node
    from kademlia.utils import digest

    dkey = digest(key)
    node = Node(dkey)
    nearest = s.protocol.router.find_neighbors(node)
    if not nearest:
        return 0
    nodes = await NodeSpiderCrawl(s.protocol, node, nearest, s.ksize, s.alpha).find()
    if not nodes:
        return 0
    biggest = max(n.distance_to(node) for n in nodes)
    local = 0
    if s.node.distance_to(node) < biggest:
        s.storage[dkey] = value
        local = 1
    results = await asyncio.gather(*(s.protocol.call_store(n, dkey, value) for n in nodes))
    return local + sum(1 for r in results if r)


# ---------------------------------------------------------------------------- impls
class Impl:
    """One implementation's face to the scenario.

    ``publish`` returns the number of nodes that stored the record, per key (the most is
    k); ``lookup`` returns (workers asked about, {worker: issued_at of the record found})."""

    name = ""
    refresh_period = 0.0    # the implementation's own table refresh period, s
    sees_dead = True        # False: lookups ask only about live workers (kademlia's gets)
    nodes: dict[int, Any]
    idents: list[Identity]
    timeouts = ""

    # what the scenario reads of the network: here in this process; a sharded run
    # (``scale_procs.Sharded``) asks its shard processes instead
    async def counts(self, world: World) -> tuple[int, int, int, int]:
        """(datagrams, bytes, table refreshes, datagrams dropped at the split)."""
        return world.datagrams, world.bytes, world.refreshes, world.dropped

    async def partition(self, world: World, side: dict[str, int] | None) -> None:
        """Split the network (ip -> side) or, with None, heal it."""
        world.side = side or {}
        world.split = side is not None

    async def rss(self) -> int:
        return rss_bytes()

    async def cpu(self) -> float:
        """CPU seconds spent by every process that runs nodes (here: this one)."""
        return time.process_time()

    async def aextra(self, alive: list[int]) -> dict[str, Any]:
        return self.extra(alive)

    meter: Any = None       # scale_pace.LoopMeter of the process that runs the nodes

    async def lag(self) -> dict[str, float]:
        """Loop lag and GC pauses of the process(es) running the nodes, since the last
        call (``scale_pace``); a sharded run asks every shard."""
        return self.meter.take() if self.meter is not None else {}

    async def settle(self) -> None:
        """After the join: collect once and freeze what survived (the node objects),
        in every process that runs nodes, so later full collections stop walking
        thousands of nodes' tables (a real agent's process holds one node)."""
        gc.collect()
        gc.freeze()

    async def make(self, i: int, world: World) -> None: ...
    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None: ...
    async def publish(self, w: int, record: WorkerRecord) -> float: ...
    async def lookup(self, i: int, service: str,
                     workers: list[int]) -> tuple[list[int], dict[int, float]]: ...
    def stop(self, i: int) -> None: ...
    def addr(self, i: int) -> tuple[str, int]: ...
    def refresh_every(self, alive: list[int], period: float | None) -> None:
        """Next table refresh of every live node in ``period`` seconds and every
        ``period`` after (``--refresh-interval`` in the rests); None: the node's own."""
    def extra(self, alive: list[int]) -> dict[str, Any]:
        return {}


class RMA(Impl):
    name = "rma"

    refresh_period = 900.0      # DHTNode's default (the agent's)

    def __init__(self, idents: list[Identity]) -> None:
        from agent.dht.server import DHTNode
        self.DHTNode = DHTNode
        self.idents = idents
        self.nodes = {}             # index -> node (a shard holds only some: --procs)
        self.by_id: dict[bytes, int] = {}
        self.by_id = {ident.node_id: i for i, ident in enumerate(idents)}
        self.timeouts = "adaptive per peer (rto 0.2-2 s) plus hedged requests"

    async def make(self, i: int, world: World) -> None:
        node = self.DHTNode(self.idents[i])
        self.refresh_period = node.refresh_interval
        inner = node._refresh       # the refresh timer's work, bound at listen()

        def refresh(inner: Any = inner) -> None:
            world.refreshes += 1
            inner()

        node._refresh = refresh
        ip = address(i)
        await node.listen(0, ip)
        node.protocol.transport = Tap(node.protocol.transport, ip, world)
        node.trust(ip)
        self.nodes[i] = node

    def addr(self, i: int) -> tuple[str, int]:
        n = self.nodes[i]
        return (n.interface, n.port)

    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None:
        await self.nodes[i].bootstrap(seeds)

    async def publish(self, w: int, record: WorkerRecord) -> float:
        return await self.nodes[w].announce(record) / len(record.keys())

    async def lookup(self, i: int, service: str,
                     workers: list[int]) -> tuple[list[int], dict[int, float]]:
        got = await self.nodes[i].find_providers(service)
        by_id = self.by_id
        return workers, {by_id[r.worker_id]: r.issued_at for r in got
                         if r.worker_id in by_id}

    def stop(self, i: int) -> None:
        self.nodes[i].stop()

    def refresh_every(self, alive: list[int], period: float | None) -> None:
        for i in alive:
            node = self.nodes[i]
            node._timers["refresh"].cancel()
            node._every("refresh", period or self.refresh_period, node._refresh)

    def extra(self, alive: list[int]) -> dict[str, Any]:
        st = [self.nodes[i].stats() for i in alive]
        drops: dict[str, int] = {}
        for s in st:
            for k, v in s["drops"].items():
                drops[k] = drops.get(k, 0) + v
        return {"rpc_timeouts": sum(s["timeouts"] for s in st),
                "retransmissions": sum(s.get("retransmissions", 0) for s in st),
                "routing_table_total": sum(s["routing_table_size"] for s in st),
                "contacts_removed": sum(s["removed_contacts"] for s in st),
                "revived": sum(s["revived"] for s in st),
                "mean_routing_table": sum(s["routing_table_size"] for s in st) / len(st),
                "records_stored": sum(s["records_stored"] for s in st),
                # no worker here ever withdraws: a tombstone stored is an honest worker
                # withdrawn (issue 16: must stay 0)
                "tombstones_stored": sum(s.get("tombstones_stored", 0) for s in st),
                "drops": drops}


class Plain(Impl):
    """Plain ``kademlia``: one value per key, so worker w sets ``"<service>:<w>"``; a
    lookup of a service is one ``get`` per worker, ``gets`` of them sampled at random
    (0 = every worker of the service)."""

    name = "kademlia"
    sees_dead = False

    refresh_period = 3600.0     # kademlia's ``refresh_table`` default

    def __init__(self, idents: list[Identity], rpc_timeout: float, gets: int) -> None:
        from kademlia.network import Server
        self.Server = Server
        self.idents = idents
        self.rpc_timeout = rpc_timeout
        self.gets = gets
        self.world = World()        # the scenario's, from make()
        self.nodes = {}
        self.ips: dict[int, str] = {}
        self.rng = random.Random(7)
        self.timeouts = f"fixed {rpc_timeout:g} s per RPC (rpcudp), no hedging"

    async def make(self, i: int, world: World) -> None:
        self.world = world
        node = self.Server(node_id=self.idents[i].node_id)
        count_refreshes(node, world)
        ip = address(i)
        await node.listen(0, ip)
        node.protocol._wait_timeout = self.rpc_timeout
        node.protocol.transport = Tap(node.protocol.transport, ip, world)
        self.nodes[i] = node
        self.ips[i] = ip

    def addr(self, i: int) -> tuple[str, int]:
        return (self.ips[i], self.nodes[i].transport.get_extra_info("sockname")[1])

    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None:
        await self.nodes[i].bootstrap(seeds)

    async def publish(self, w: int, record: WorkerRecord) -> float:
        return await kademlia_set(self.nodes[w], f"{record.services[0]}:{w}",
                                  record.encode())

    async def lookup(self, i: int, service: str,
                     workers: list[int]) -> tuple[list[int], dict[int, float]]:
        asked = workers if not self.gets else self.rng.sample(workers,
                                                             min(self.gets, len(workers)))
        vals = await asyncio.gather(*(self.nodes[i].get(f"{service}:{w}") for w in asked))
        found: dict[int, float] = {}
        for w, v in zip(asked, vals, strict=True):
            if v is None:
                continue
            try:
                found[w] = WorkerRecord.decode(v).issued_at
            except (RecordError, ValueError, TypeError):
                continue
        return asked, found

    def stop(self, i: int) -> None:
        self.nodes[i].stop()

    def refresh_every(self, alive: list[int], period: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.world.refresh_override = period
        for i in alive:
            node = self.nodes[i]
            if node.refresh_loop is not None:
                node.refresh_loop.cancel()
            node.refresh_loop = loop.call_later(period or self.refresh_period,
                                                node.refresh_table)
