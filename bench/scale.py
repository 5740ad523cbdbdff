"""The DHT at the platform's size: N nodes, W workers over S services, churn, a partition.

    python3 bench/scale.py --nodes 1000 --workers 200 --services 1
    python3 bench/scale.py --nodes 5000 --workers 2000 --services 20 --largest 1000
    (add --json for machine-readable output, --only rma|kademlia, --rest 600)

Real code, real sockets: every node is the agent's own ``DHTNode`` (plain ``kademlia``
``Server`` for the baseline) on its own loopback address (127.0.x.y, one UDP socket each),
all in this process on uvloop. The baseline runs the same phases in a child process
afterwards, under a wall-clock cap; a phase it could not reach is reported as "did not
finish".

Phases (each bounded in time):

1. **join** — nodes bootstrap in waves of 50 through already joined nodes.
2. **announce** — worker w (node w, its own identity) announces its signed record for its
   service; a second round (the periodic republish) measures what a republish costs.
3. **lookups** — sequential lookups from random nodes, every other one for the largest
   service: found share (live workers in the answer / live workers of the service),
   p50/p99 latency, datagrams and bytes per lookup (every datagram any node sent during
   the phase, replies included, divided by lookups), CPU per lookup (this process's CPU
   time, i.e. every node's work, divided by lookups); then waves of ``--concurrent``
   lookups at once: lookups/s.
4. **rest** — ``--rest`` seconds with no client traffic and no republish: datagrams/s per
   node (what the DHT sends on its own: refresh, liveness, handoff), and memory per node
   (RSS growth from creating and joining the nodes, before any record, divided by N).
5. **churn** — 30 % of the nodes stop without goodbye (their workers with them); lookups
   at once, then after one republish round of the live workers spread over
   ``--republish`` seconds.
6. **partition** — the live nodes are split in two halves (datagrams between them are
   dropped at the sender) for ``--republish`` seconds while workers keep republishing;
   lookups during the split report what each side still finds of its own side's workers;
   then the heal: batches of lookups from both sides until one batch finds every live
   worker of every service (time after the heal; capped at 3 republish intervals).
7. **coordinators** — a real HTTP server on 127.0.0.1 stands for the coordinators; the
   simulated agents apply the product's fallback rules (a worker whose announce stored on
   no node POSTs its record, ``WorkerRole``; a caller whose DHT answer is empty asks the
   registry, ``DiscoveryComponent``). Requests per worker per hour over the healthy
   phases (announce, lookups, rest) are reported.

The churn and partition phases keep the republish period short (``--republish``, 30 s by
default: the agent's default ``republish_interval``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord

JOIN_WAVE = 50
ANNOUNCE_PARALLEL = 64


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def address(i: int) -> str:
    """Node i's own loopback address: 127.0.x.y (x, y in 1..250)."""
    return f"127.{1 + i // 62500}.{1 + (i // 250) % 250}.{1 + i % 250}"


class World:
    """Counts every datagram sent and drops those crossing a partition."""

    def __init__(self) -> None:
        self.datagrams = 0
        self.bytes = 0
        self.dropped = 0
        self.side: dict[str, int] = {}     # ip -> side while partitioned
        self.split = False

    def snapshot(self) -> tuple[int, int]:
        return self.datagrams, self.bytes


class Tap:
    """Stands in for a node's UDP transport: counts, and drops across a partition."""

    def __init__(self, transport: Any, ip: str, world: World) -> None:
        self._t = transport
        self._ip = ip
        self._w = world

    def sendto(self, data: bytes, addr: Any = None) -> None:
        w = self._w
        if w.split and w.side.get(self._ip) != w.side.get(addr[0]):
            w.dropped += 1
            return
        w.datagrams += 1
        w.bytes += len(data)
        self._t.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class Coordinator:
    """A real HTTP endpoint standing for the coordinators; counts what reaches it."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._runner: Any = None
        self._session: Any = None

    async def start(self) -> None:
        from aiohttp import ClientSession, web

        async def handle(request: web.Request) -> web.Response:
            self.requests += 1
            await request.read()
            return web.json_response({"records": []})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
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


# ---------------------------------------------------------------------------- impls
class Impl:
    name = ""
    nodes: list[Any]

    async def make(self, i: int, world: World) -> None: ...
    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None: ...
    async def publish(self, w: int, record: WorkerRecord) -> bool: ...
    async def lookup(self, i: int, service: str, workers: list[int]) -> set[int]: ...
    def stop(self, i: int) -> None: ...
    def addr(self, i: int) -> tuple[str, int]: ...
    def extra(self, alive: list[int]) -> dict[str, Any]:
        return {}


class RMA(Impl):
    name = "rma"

    def __init__(self, idents: list[Identity]) -> None:
        from agent.dht.server import DHTNode
        self.DHTNode = DHTNode
        self.idents = idents
        self.nodes = []
        self.by_id: dict[bytes, int] = {}

    async def make(self, i: int, world: World) -> None:
        node = self.DHTNode(self.idents[i])
        ip = address(i)
        await node.listen(0, ip)
        node.protocol.transport = Tap(node.protocol.transport, ip, world)
        node.trust(ip)
        self.nodes.append(node)
        self.by_id[self.idents[i].node_id] = i

    def addr(self, i: int) -> tuple[str, int]:
        n = self.nodes[i]
        return (n.interface, n.port)

    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None:
        await self.nodes[i].bootstrap(seeds)

    async def publish(self, w: int, record: WorkerRecord) -> bool:
        return await self.nodes[w].announce(record) > 0

    async def lookup(self, i: int, service: str, workers: list[int]) -> set[int]:
        got = await self.nodes[i].find_providers(service)
        by_id = self.by_id
        return {by_id[r.worker_id] for r in got if r.worker_id in by_id}

    def stop(self, i: int) -> None:
        self.nodes[i].stop()

    def extra(self, alive: list[int]) -> dict[str, Any]:
        st = [self.nodes[i].stats() for i in alive]
        drops: dict[str, int] = {}
        for s in st:
            for k, v in s["drops"].items():
                drops[k] = drops.get(k, 0) + v
        return {"rpc_timeouts": sum(s["timeouts"] for s in st),
                "contacts_removed": sum(s["removed_contacts"] for s in st),
                "revived": sum(s["revived"] for s in st),
                "mean_routing_table": statistics.fmean(s["routing_table_size"] for s in st),
                "records_stored": sum(s["records_stored"] for s in st),
                "drops": drops}


class Plain(Impl):
    """Plain ``kademlia``: one value per key, so worker w sets ``"<service>:<w>"``."""

    name = "kademlia"

    def __init__(self, idents: list[Identity]) -> None:
        from kademlia.network import Server
        self.Server = Server
        self.idents = idents
        self.nodes = []
        self.ips: list[str] = []

    async def make(self, i: int, world: World) -> None:
        node = self.Server(node_id=self.idents[i].node_id)
        ip = address(i)
        await node.listen(0, ip)
        node.protocol.transport = Tap(node.protocol.transport, ip, world)
        self.nodes.append(node)
        self.ips.append(ip)

    def addr(self, i: int) -> tuple[str, int]:
        return (self.ips[i], self.nodes[i].transport.get_extra_info("sockname")[1])

    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None:
        await self.nodes[i].bootstrap(seeds)

    async def publish(self, w: int, record: WorkerRecord) -> bool:
        return bool(await self.nodes[w].set(f"{record.services[0]}:{w}", record.encode()))

    async def lookup(self, i: int, service: str, workers: list[int]) -> set[int]:
        # one value per key: a lookup of a service is one get per worker; sample 5
        sample = random.sample(workers, min(5, len(workers)))
        vals = await asyncio.gather(*(self.nodes[i].get(f"{service}:{w}") for w in sample))
        found = {w for w, v in zip(sample, vals, strict=True) if v is not None}
        # scale the sample to the service: found share is what is reported
        return set(workers[: round(len(workers) * len(found) / max(1, len(sample)))])

    def stop(self, i: int) -> None:
        self.nodes[i].stop()


# ---------------------------------------------------------------------------- scenario
class Scenario:
    def __init__(self, impl: Impl, args: argparse.Namespace, emit: Any) -> None:
        self.impl = impl
        self.args = args
        self.emit = emit
        self.world = World()
        self.rng = random.Random(args.seed)
        self.coord = Coordinator()
        n, w = args.nodes, args.workers
        # services: the largest first, the rest share what is left evenly
        sizes = [min(args.largest or w, w)]
        rest = w - sizes[0]
        others = max(0, args.services - 1)
        for k in range(others):
            sizes.append(rest // others + (1 if k < rest % others else 0))
        self.services = [f"svc{k:02d}" for k in range(len(sizes))]
        self.members: dict[str, list[int]] = {}
        worker = 0
        for svc, size in zip(self.services, sizes, strict=True):
            self.members[svc] = list(range(worker, worker + size))
            worker += size
        self.service_of = {wk: svc for svc, ws in self.members.items() for wk in ws}
        self.n = n
        self.alive: list[int] = list(range(n))
        self.dead: set[int] = set()
        self.records: dict[int, WorkerRecord] = {}
        self.fallback_register = 0
        self.fallback_registry = 0
        self._republishing = False
        self.errors: dict[str, int] = {}

    # -- helpers ------------------------------------------------------------------
    def record(self, w: int, ttl: float) -> WorkerRecord:
        return WorkerRecord.create(
            self.impl.idents[w], name=f"w{w}", services=(self.service_of[w],),  # type: ignore[attr-defined]
            endpoint=f"https://w{w}.example.org", gpu="A100", gpu_memory_gb=80,
            load=self.rng.random() * 4, capacity=4, region="eu", ttl=ttl,
            refresh=float(self.args.republish))

    async def publish(self, w: int, ttl: float) -> bool:
        rec = self.record(w, ttl)
        self.records[w] = rec
        try:
            ok = await self.impl.publish(w, rec)
        except Exception:
            ok = False
        if not ok:
            self.fallback_register += 1
            await self.coord.register(rec.encode())
        return ok

    async def lookup(self, i: int, svc: str) -> tuple[float, float]:
        live = [w for w in self.members[svc] if w not in self.dead]
        t0 = time.perf_counter()
        try:
            got = await asyncio.wait_for(self.impl.lookup(i, svc, live), 30)
        except Exception as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            got = set()
        dt = time.perf_counter() - t0
        if os.environ.get("SCALE_DEBUG") and live and len(got & set(live)) < len(live):
            print(f"miss: node {i} {svc} {len(got & set(live))}/{len(live)}", file=sys.stderr)
            if isinstance(self.impl, RMA):
                from kademlia.node import Node

                from agent.dht.crawling import ProviderLookup
                from agent.dht.record import service_key
                nd = self.impl.nodes[i]
                key = service_key(svc)
                peers = nd.protocol.router.find_neighbors(Node(key), k=20)
                cr = ProviderLookup(nd.protocol, key, peers, width=6, alpha=3)
                r = await cr.find()
                order = sorted(self.alive, key=lambda j: self.impl.nodes[j].node.long_id
                               ^ int.from_bytes(key, "big"))
                rank = {self.impl.nodes[j].node.id: k for k, j in enumerate(order)}
                print("  again", len(r), "states", sorted((rank.get(n, -1), st) for n, st
                                                         in cr.state.items())[:30],
                      "peers", len(peers), "queried", cr.queried, "suspects",
                      sum(1 for p in peers if nd.protocol.is_suspect(p.id)),
                      "holders", [self.impl.nodes[j].storage.count(key) for j in order[:22]],
                      file=sys.stderr)
                for r0 in order[:3]:
                    known = {c.id for c in self.impl.nodes[r0].protocol.router.all_contacts()}
                    print("  rank", order.index(r0), "node", r0, "knows ranks",
                          [k for k, j in enumerate(order[:12]) if self.impl.nodes[j].node.id
                           in known], "table", len(known), file=sys.stderr)
        if not got:
            self.fallback_registry += 1
            await self.coord.registry(svc)
        return dt, (len(got & set(live)) / len(live)) if live else 1.0

    def pick_service(self, k: int) -> str:
        if k % 2 == 0 or len(self.services) == 1:
            return self.services[0]
        return self.rng.choice(self.services[1:])

    async def lookups(self, count: int, concurrency: int, cap: float,
                      nodes: list[int] | None = None) -> dict[str, Any]:
        nodes = nodes or self.alive
        lat_big: list[float] = []
        lat: list[float] = []
        found: list[float] = []
        found_big: list[float] = []
        sem = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + cap

        async def one(k: int) -> None:
            if time.monotonic() > deadline:
                return
            svc = self.pick_service(k)
            async with sem:
                dt, f = await self.lookup(self.rng.choice(nodes), svc)
            lat.append(dt)
            found.append(f)
            if svc == self.services[0]:
                lat_big.append(dt)
                found_big.append(f)

        await asyncio.gather(*(one(k) for k in range(count)))
        return {"n": len(found), "found": statistics.fmean(found) if found else 0.0,
                "all_found_share": sum(1 for f in found if f >= 1.0) / max(1, len(found)),
                "found_largest": statistics.fmean(found_big) if found_big else 0.0,
                "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                "largest_p50_ms": pct(lat_big, 50) * 1e3,
                "largest_p99_ms": pct(lat_big, 99) * 1e3}

    async def republish_round(self, spread: float) -> None:
        live = [w for w in self.records if w not in self.dead]
        self.rng.shuffle(live)
        t0 = time.monotonic()
        tasks = []
        for k, w in enumerate(live):
            delay = t0 + spread * k / max(1, len(live)) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self.publish(w, self.args.ttl)))
        await asyncio.gather(*tasks)

    async def republish_loop(self) -> None:
        while self._republishing:
            await self.republish_round(self.args.republish)

    # -- phases -------------------------------------------------------------------
    async def run(self) -> None:
        a = self.args
        impl = self.impl
        await self.coord.start()
        cpu0 = time.process_time()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        for i in range(self.n):
            await impl.make(i, self.world)
        addrs = [impl.addr(i) for i in range(self.n)]
        for i in range(1, self.n, JOIN_WAVE):
            seeds = [addrs[j] for j in self.rng.sample(range(i), min(3, i))]
            await asyncio.gather(*(impl.join(j, seeds) for j in range(i, min(self.n, i + JOIN_WAVE))))
            if time.perf_counter() - t0 > a.phase_cap * 4:
                self.emit("join", {"did_not_finish": True, "joined": i})
                return
        await asyncio.sleep(1.0)
        gc.collect()
        gc.freeze()
        rss1 = rss_bytes()
        self.emit("join", {"seconds": time.perf_counter() - t0,
                           "memory_per_node_kb": (rss1 - rss0) / self.n / 1024,
                           "cpu_s": time.process_time() - cpu0})

        # announce + one republish round
        healthy_t0 = time.monotonic()
        coord0 = self.coord.requests
        workers = list(range(a.workers))
        for rnd in ("announce", "republish"):
            d0, b0 = self.world.snapshot()
            t = time.perf_counter()
            sem = asyncio.Semaphore(ANNOUNCE_PARALLEL)
            times: list[float] = []

            async def pub(w: int, sem: asyncio.Semaphore = sem,
                          times: list[float] = times) -> bool:
                async with sem:
                    s = time.perf_counter()
                    ok = await self.publish(w, a.ttl)
                    times.append(time.perf_counter() - s)
                    return ok

            oks = await asyncio.gather(*(pub(w) for w in workers))
            d1, b1 = self.world.snapshot()
            self.emit(rnd, {"seconds": time.perf_counter() - t, "ok": sum(oks),
                            "p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3,
                            "datagrams_per_announce": (d1 - d0) / len(workers),
                            "bytes_per_announce": (b1 - b0) / len(workers)})
        await asyncio.sleep(1.0)

        # healthy lookups
        d0, b0 = self.world.snapshot()
        c0 = time.process_time()
        res = await self.lookups(a.lookups, 1, a.phase_cap)
        d1, b1 = self.world.snapshot()
        c1 = time.process_time()
        k = max(1, res["n"])
        res.update({"datagrams_per_lookup": (d1 - d0) / k, "bytes_per_lookup": (b1 - b0) / k,
                    "cpu_ms_per_lookup": (c1 - c0) * 1e3 / k})
        self.emit("lookups", res)
        t = time.perf_counter()
        conc = await self.lookups(a.concurrent * a.waves, a.concurrent, a.phase_cap)
        conc["lookups_per_s"] = conc["n"] / (time.perf_counter() - t)
        self.emit("concurrent", conc)

        # rest
        await asyncio.sleep(2.0)
        d0, _ = self.world.snapshot()
        t = time.monotonic()
        await asyncio.sleep(a.rest)
        d1, _ = self.world.snapshot()
        dt = time.monotonic() - t
        hours = (time.monotonic() - healthy_t0) / 3600
        self.emit("rest", {"seconds": dt, "datagrams_per_s_per_node": (d1 - d0) / dt / self.n,
                           "rss_mb": rss_bytes() / 2**20})
        self.emit("coordinators", {
            "requests": self.coord.requests - coord0,
            "per_worker_per_hour": (self.coord.requests - coord0) / len(workers) / hours,
            "fallback_registers": self.fallback_register,
            "fallback_registry_reads": self.fallback_registry})

        # churn: 30 % stop without goodbye
        victims = self.rng.sample(range(self.n), int(self.n * 0.3))
        for v in victims:
            impl.stop(v)
            self.dead.add(v)
        self.alive = [i for i in range(self.n) if i not in self.dead]
        res = await self.lookups(a.lookups // 2, a.churn_concurrency, a.phase_cap)
        self.emit("churn", res)
        t = time.perf_counter()
        await self.republish_round(a.republish)
        res = await self.lookups(a.lookups // 2, a.churn_concurrency, a.phase_cap)
        res["republish_round_s"] = time.perf_counter() - t
        self.emit("churn_after_republish", res)

        # partition in two halves, workers keep republishing
        half = self.alive[:]
        self.rng.shuffle(half)
        side_a = set(half[: len(half) // 2])
        for i in self.alive:
            self.world.side[address(i)] = 0 if i in side_a else 1
        self.world.split = True
        self._republishing = True
        loop_task = asyncio.ensure_future(self.republish_loop())
        await asyncio.sleep(a.republish)
        own: list[float] = []
        for k in range(min(40, a.lookups)):
            i = self.rng.choice(self.alive)
            svc = self.pick_service(k)
            mine = [w for w in self.members[svc]
                    if w not in self.dead and (w in side_a) == (i in side_a)]
            if not mine:
                continue
            got = await impl.lookup(i, svc, mine)
            own.append(len(got & set(mine)) / len(mine))
        self.emit("partition", {"seconds": a.republish, "own_side_found":
                                statistics.fmean(own) if own else 0.0,
                                "dropped_datagrams": self.world.dropped})
        self.world.split = False
        healed = time.monotonic()
        heal_s: float | None = None
        last: dict[str, Any] = {}
        while time.monotonic() - healed < 3 * a.republish:
            last = await self.lookups(40, 20, a.phase_cap)
            if last["found"] >= 1.0:
                heal_s = time.monotonic() - healed
                break
            await asyncio.sleep(1.0)
        self._republishing = False
        self.emit("heal", {"seconds_to_all_found": heal_s, "last_batch_found": last.get("found"),
                           "within_one_republish": heal_s is not None and heal_s <= a.republish})
        loop_task.cancel()
        self.emit("extra", impl.extra(self.alive) | {"lookup_errors": self.errors})
        for i in self.alive:
            impl.stop(i)
        await self.coord.stop()


def run_child(args: argparse.Namespace, only: str) -> dict[str, Any]:
    """One implementation in this process; phases are emitted as JSON lines."""
    out: dict[str, Any] = {}

    def emit(phase: str, data: dict[str, Any]) -> None:
        out[phase] = data
        print(json.dumps({"phase": phase, "data": data}), flush=True)

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    logging.getLogger("agent").setLevel(logging.ERROR)
    rng = random.Random(args.seed)
    random.seed(args.seed)
    idents = [Identity.from_private_bytes(rng.randbytes(32)) for _ in range(args.nodes)]
    impl: Impl = RMA(idents) if only == "rma" else Plain(idents)
    uvloop.run(Scenario(impl, args, emit).run())
    return out


def run_impl(args: argparse.Namespace, only: str, cap: float) -> tuple[dict[str, Any], bool]:
    """Run one implementation in a child process under a wall-clock cap; its phases
    arrive as JSON lines (a phase it never reached is missing: "did not finish")."""
    import tempfile
    cmd = [sys.executable, __file__, "--child", only] + [
        a for a in sys.argv[1:] if a not in ("--json",)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryFile("w+") as f:
        proc = subprocess.Popen(cmd, stdout=f)
        try:
            proc.wait(timeout=cap)
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            finished = False
        f.seek(0)
        for line in f:
            try:
                msg = json.loads(line)
                out[msg["phase"]] = msg["data"]
            except (ValueError, KeyError, TypeError):
                pass
    return out, finished


ROWS = [
    ("join", "seconds", "join: seconds", 1),
    ("join", "memory_per_node_kb", "memory per node, KB (RSS, before records)", 1),
    ("announce", "ok", "announce: stored (of W)", 0),
    ("announce", "p99_ms", "announce p99 ms", 1),
    ("republish", "datagrams_per_announce", "republish: datagrams per announce", 1),
    ("lookups", "found", "healthy: found share", 4),
    ("lookups", "found_largest", "healthy: found share, largest service", 4),
    ("lookups", "largest_p50_ms", "healthy: largest service p50 ms", 2),
    ("lookups", "largest_p99_ms", "healthy: largest service p99 ms", 2),
    ("lookups", "p50_ms", "healthy: all lookups p50 ms", 2),
    ("lookups", "datagrams_per_lookup", "datagrams per lookup", 1),
    ("lookups", "bytes_per_lookup", "bytes per lookup", 0),
    ("lookups", "cpu_ms_per_lookup", "CPU ms per lookup (all nodes)", 2),
    ("concurrent", "lookups_per_s", "lookups/s, concurrent", 0),
    ("concurrent", "found", "concurrent: found share", 4),
    ("rest", "datagrams_per_s_per_node", "rest: datagrams/s per node", 3),
    ("coordinators", "per_worker_per_hour", "coordinator HTTP per worker per hour", 3),
    ("churn", "found", "30 % churn: found share at once", 4),
    ("churn", "p99_ms", "30 % churn: p99 ms at once", 1),
    ("churn_after_republish", "found", "churn: found after one republish", 4),
    ("churn_after_republish", "p99_ms", "churn: p99 ms after one republish", 1),
    ("partition", "own_side_found", "split: own side's workers found", 4),
    ("heal", "seconds_to_all_found", "heal: seconds until all found", 1),
]


def fmt(v: Any, digits: int) -> str:
    if v is None:
        return "never"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report(results: dict[str, tuple[dict[str, Any], bool]], args: argparse.Namespace) -> None:
    names = list(results)
    print(f"bench/scale.py  N={args.nodes} W={args.workers} S={args.services} "
          f"largest={args.largest or args.workers} republish={args.republish:g}s "
          f"rest={args.rest:g}s")
    print(f"{'metric':<46}" + "".join(f"{n:>18}" for n in names))
    for phase, key, label, digits in ROWS:
        cells = []
        for n in names:
            data, _fin = results[n]
            cells.append(fmt(data[phase].get(key), digits) if phase in data and key in data[phase]
                         else "did not finish")
        print(f"{label:<46}" + "".join(f"{c:>18}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--services", type=int, default=1)
    ap.add_argument("--largest", type=int, default=0, help="workers of the largest service")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--churn-concurrency", type=int, default=20)
    ap.add_argument("--republish", type=float, default=30.0)
    ap.add_argument("--ttl", type=float, default=1200.0)
    ap.add_argument("--rest", type=float, default=600.0)
    ap.add_argument("--phase-cap", type=float, default=120.0)
    ap.add_argument("--baseline-cap", type=float, default=900.0,
                    help="wall-clock cap for the plain kademlia run, seconds")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("BENCH_SEED", "1")))
    ap.add_argument("--only", choices=("rma", "kademlia"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=("rma", "kademlia"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers > args.nodes:
        ap.error("--workers must not exceed --nodes (worker w runs on node w)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.nodes + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.nodes + 1024), hard))
    if args.child:
        run_child(args, args.child)
        return 0
    results: dict[str, tuple[dict[str, Any], bool]] = {}
    for impl in ("rma", "kademlia"):
        if args.only and impl != args.only:
            continue
        cap = args.baseline_cap if impl == "kademlia" else 10 * 3600
        results[impl] = run_impl(args, impl, cap)
    if args.json:
        print(json.dumps({n: {"finished": fin, **data} for n, (data, fin) in results.items()},
                         indent=1))
    else:
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
