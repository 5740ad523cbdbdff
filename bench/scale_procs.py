"""``bench/scale.py --procs P``: the nodes sharded over P processes.

Why: one Python process runs all N nodes on one core; at N = 5,000 it could not keep the
workers' republish interval, so the partition phase never finished. Here node i lives in
shard ``i % P`` (its own process, the agent's own ``DHTNode`` or plain ``kademlia``,
its own 127.x.y.z UDP socket as before), and nodes in different shards talk over real
UDP like any others. The scenario (``scale_phases.Scenario``) runs unchanged in the
driver process against :class:`Sharded`, which forwards every call to the node's shard
over a pipe (one JSON line per request and per answer) and sums the shards' counters.

Under ``--wan`` every shard builds the same placement (``bench/wan.py`` depends only on
the profile, N and the seed) and delays its own nodes' datagrams; the Gilbert-Elliott
state of a remote receiver's access link is kept per sending shard (same loss share,
bursts correlated per shard rather than network-wide).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

from scale_net import Impl, World, rss_bytes
from scale_pace import LoopMeter, calm_gc, merge_lag

from agent.dht.record import WorkerRecord


class Sharded(Impl):
    """The scenario's face to P shard processes."""

    def __init__(self, inner: Impl, procs: int, argv: list[str]) -> None:
        self.name = inner.name
        self.sees_dead = inner.sees_dead
        self.refresh_period = inner.refresh_period
        self.idents = inner.idents
        self.timeouts = inner.timeouts + f"; nodes sharded over {procs} processes"
        self.procs = procs
        self.argv = argv
        self.nodes = {}
        self._addr: dict[int, tuple[str, int]] = {}
        self._shards: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Future[None]] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0

    async def start(self) -> None:
        if self._shards:
            return
        for k in range(self.procs):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *self.argv, "--shard", str(k),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=1 << 24)
            self._shards.append(proc)
            self._readers.append(asyncio.ensure_future(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            fut = self._pending.pop(msg.get("id", -1), None)
            if fut is None or fut.done():
                continue
            if "err" in msg:
                fut.set_exception(RuntimeError(msg["err"]))
            else:
                fut.set_result(msg.get("ok"))
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(RuntimeError("a shard process ended"))

    def _send(self, k: int, op: str, *args: Any) -> asyncio.Future[Any]:
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        stdin = self._shards[k].stdin
        assert stdin is not None
        stdin.write(json.dumps({"id": self._next, "op": op, "args": args}).encode() + b"\n")
        return fut

    async def _all(self, op: str, *args: Any) -> list[Any]:
        await self.start()
        return list(await asyncio.gather(*(self._send(k, op, *args)
                                           for k in range(self.procs))))

    # -- the Impl face ----------------------------------------------------------------
    async def make(self, i: int, world: World) -> None:
        await self.start()
        ip, port = await self._send(i % self.procs, "make", i)
        self._addr[i] = (ip, port)
        self.nodes[i] = i

    def addr(self, i: int) -> tuple[str, int]:
        return self._addr[i]

    async def join(self, i: int, seeds: list[tuple[str, int]]) -> None:
        await self._send(i % self.procs, "join", i, seeds)

    async def publish(self, w: int, record: WorkerRecord) -> float:
        return float(await self._send(w % self.procs, "publish", w,
                                      base64.b64encode(record.encode()).decode()))

    async def lookup(self, i: int, service: str,
                     workers: list[int]) -> tuple[list[int], dict[int, float]]:
        asked, got = await self._send(i % self.procs, "lookup", i, service, workers)
        return asked, {int(k): v for k, v in got.items()}

    def stop(self, i: int) -> None:
        self._send(i % self.procs, "stop", i)

    def refresh_every(self, alive: list[int], period: float | None) -> None:
        for k in range(self.procs):
            self._send(k, "refresh_every", [i for i in alive if i % self.procs == k], period)

    async def counts(self, world: World) -> tuple[int, int, int, int]:
        parts = await self._all("counts")
        d, b, r, x = (sum(p[j] for p in parts) for j in range(4))
        return d, b, r, x

    async def partition(self, world: World, side: dict[str, int] | None) -> None:
        await self._all("partition", side)

    async def rss(self) -> int:
        return sum(await self._all("rss")) + rss_bytes()

    async def lag(self) -> dict[str, float]:
        parts = await self._all("lag")
        return merge_lag([p for p in parts if p] +
                         ([self.meter.take()] if self.meter is not None else []))

    async def settle(self) -> None:
        await self._all("settle")
        await super().settle()

    async def wan_counts(self) -> list[list[int]]:
        """Each shard's (datagrams the WAN model saw, datagrams it lost)."""
        return await self._all("wan")

    async def cpu(self) -> float:
        return sum(await self._all("cpu")) + time.process_time()

    async def aextra(self, alive: list[int]) -> dict[str, Any]:
        await self.start()
        parts = [p for p in await asyncio.gather(*(
            self._send(k, "extra", [i for i in alive if i % self.procs == k])
            for k in range(self.procs))) if p]
        out: dict[str, Any] = {}
        for p in parts:
            for key, v in p.items():
                if isinstance(v, dict):
                    d = out.setdefault(key, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
                elif isinstance(v, int | float) and key != "mean_routing_table":
                    out[key] = out.get(key, 0) + v
        if "routing_table_total" in out and alive:
            out["mean_routing_table"] = out["routing_table_total"] / len(alive)
        return out

    async def close(self) -> None:
        for proc in self._shards:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self._shards:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()


async def serve_shard(impl: Impl, world: World) -> None:
    """A shard: answers the driver's requests (stdin) one JSON line each (stdout)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    calm_gc()
    impl.meter = LoopMeter()
    impl.meter.start()

    async def handle(msg: dict[str, Any]) -> None:
        op, args = msg["op"], msg["args"]
        try:
            result = await _op(impl, world, op, args)
            line = {"id": msg["id"], "ok": result}
        except Exception as exc:
            line = {"id": msg["id"], "err": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(line) + "\n")
        out.flush()

    tasks = set()
    while line := await reader.readline():
        t = asyncio.ensure_future(handle(json.loads(line)))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    for i in list(impl.nodes):
        impl.stop(i)


async def _op(impl: Impl, world: World, op: str, args: list[Any]) -> Any:
    if op == "make":
        await impl.make(args[0], world)
        return list(impl.addr(args[0]))
    if op == "join":
        await impl.join(args[0], [tuple(s) for s in args[1]])
        return None
    if op == "publish":
        rec = WorkerRecord.decode(base64.b64decode(args[1]))
        return await impl.publish(args[0], rec)
    if op == "lookup":
        asked, got = await impl.lookup(args[0], args[1], args[2])
        return [asked, {str(k): v for k, v in got.items()}]
    if op == "stop":
        if args[0] in impl.nodes:
            impl.stop(args[0])
            del impl.nodes[args[0]]
        return None
    if op == "refresh_every":
        impl.refresh_every([i for i in args[0] if i in impl.nodes], args[1])
        return None
    if op == "counts":
        return [world.datagrams, world.bytes, world.refreshes, world.dropped]
    if op == "partition":
        world.side = args[0] or {}
        world.split = args[0] is not None
        return None
    if op == "rss":
        return rss_bytes()
    if op == "wan":
        return [world.wan.sent, world.wan.lost] if world.wan is not None else [0, 0]
    if op == "lag":
        return impl.meter.take() if impl.meter is not None else {}
    if op == "settle":
        await impl.settle()
        return None
    if op == "cpu":
        return time.process_time()
    if op == "extra":
        alive = [i for i in args[0] if i in impl.nodes]
        return impl.extra(alive) if alive else {}
    raise ValueError(f"unknown op {op!r}")

