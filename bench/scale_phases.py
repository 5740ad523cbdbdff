"""The scenario of ``bench/scale.py``: join, announce, lookups, two rests, churn, a
partition and its heal, with the product's coordinator-fallback rules counted throughout.

Why each rule is what it is (see ``scale.py``'s docstring for the phases):

* **Coordinator fallback, exactly the product's rules.** A worker whose announce stored on
  no node POSTs its record (``agent.roles.worker.WorkerRole._announce_once``); a caller
  whose DHT lookup returned no record of the service, or took longer than
  ``agent.discovery.sources.DHT_TIMEOUT_S`` (the product stops waiting there), asks the
  registry (``agent.discovery.sources``). The timeout is imported, not copied. Every
  phase counts, healthy or not.
* **Found share** is recall: live workers in the answer / live workers asked about. A
  service with no live worker is never picked (it would count as "all found").
* **Heal** counts only records issued after the split began: the pre-split copies both
  sides still hold would make "finds all" true on the first try.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from scale_net import Coordinator, Impl, World, address, pct
from scale_pace import LoopHealth, Pacer, paced

from agent.dht.record import WorkerRecord
from agent.discovery.sources import DHT_TIMEOUT_S

ANNOUNCE_PARALLEL = 64
KSIZE = 20


class OutOfTime(Exception):
    """The run's cap (``--cap``, rests excluded) is spent: later phases do not run."""


class Scenario:
    def __init__(self, impl: Impl, args: argparse.Namespace, emit: Any,
                 wan: Any = None) -> None:
        self.impl = impl
        self.args = args
        self.health = LoopHealth(impl)
        self._emit = emit
        self.world = World(wan)
        # --wan: latencies are also given in median pairwise RTTs (bench/wan.py)
        self.rtt_s = wan.rtt_stats()["median_rtt_ms"] / 1000 if wan is not None else 0.0
        self.looked_up: set[int] = set()    # nodes that already ran a lookup (cold/warm)
        self.rng = random.Random(args.seed)
        self.coord = Coordinator()
        w = args.workers
        # services: the largest first, the rest share what is left evenly
        sizes = [min(args.largest or w, w)]
        rest = w - sizes[0]
        others = max(0, args.services - 1)
        for k in range(others):
            sizes.append(rest // others + (1 if k < rest % others else 0))
        self.services = [f"svc{k:02d}" for k, size in enumerate(sizes) if size > 0]
        self.members: dict[str, list[int]] = {}
        worker = 0
        for svc, size in zip(self.services, [s for s in sizes if s > 0], strict=True):
            self.members[svc] = list(range(worker, worker + size))
            worker += size
        self.service_of = {wk: svc for svc, ws in self.members.items() for wk in ws}
        self.n = args.nodes
        self.alive: list[int] = list(range(self.n))
        self.dead: set[int] = set()
        self.records: dict[int, WorkerRecord] = {}
        self.fallback: dict[str, dict[str, int]] = {}   # phase -> counts
        self._republishing = False
        self.round_seconds: list[float] = []    # each republish round, start to last answer
        self.errors: dict[str, int] = {}
        self.budget_end = 0.0               # monotonic end of --cap; rests push it later

    # -- phase, loop health -----------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.health.phase

    @phase.setter
    def phase(self, name: str) -> None:
        self.health.phase = name      # the loops' lag is folded per phase

    def emit(self, phase: str, data: dict[str, Any]) -> None:
        """A phase's figures, with the lag of the node processes' loops while it ran
        (``scale_pace``: figures measured on starved loops are the harness's, not the
        DHT's)."""
        self._emit(phase, data | self.health.pop(phase))

    # -- budget ---------------------------------------------------------------------
    def left(self) -> float:
        return self.budget_end - time.monotonic()

    def check_time(self, phase: str) -> None:
        if self.left() <= 0:
            self.emit(phase, {"did_not_finish": True})
            raise OutOfTime(phase)

    async def rest_sleep(self, seconds: float) -> None:
        """A rest: not counted against the run's cap (same for both implementations)."""
        await asyncio.sleep(seconds)
        self.budget_end += seconds

    def count(self, what: str) -> None:
        d = self.fallback.setdefault(self.phase, {"announces": 0, "registrations": 0,
                                                  "lookups": 0, "registry_reads": 0})
        d[what] += 1

    # -- helpers ------------------------------------------------------------------
    def in_rtts(self, seconds: dict[str, float]) -> dict[str, float]:
        """``{name}_rtt``: each duration in median pairwise RTTs (only under --wan)."""
        if not self.rtt_s:
            return {}
        return {f"{k}_rtt": v / self.rtt_s for k, v in seconds.items()}

    async def snap(self) -> tuple[int, int]:
        """(datagrams, bytes) every node sent so far."""
        d, b, _r, _x = await self.impl.counts(self.world)
        return d, b

    async def counters(self) -> dict[str, float]:
        """Retransmissions, RPC timeouts, contacts removed and table sizes, all live nodes
        (the agent's own counters; plain kademlia has none: empty)."""
        x = await self.impl.aextra(self.alive)
        return {k: float(x[k]) for k in ("retransmissions", "rpc_timeouts",
                                          "contacts_removed", "routing_table_total")
                if k in x}

    def record(self, w: int) -> WorkerRecord:
        return WorkerRecord.create(
            self.impl.idents[w], name=f"w{w}", services=(self.service_of[w],),
            endpoint=f"https://w{w}.example.org", gpu="A100", gpu_memory_gb=80,
            load=self.rng.random() * 4, capacity=4, region="eu", ttl=self.args.ttl,
            refresh=float(self.args.republish))

    async def coordinator_call(self, what: str, call: Any) -> None:
        """A request to the coordinators' stand-in; one that fails (a starved process's
        connect timeout) is counted with the lookup errors, never ends the run."""
        try:
            await call
        except Exception as exc:
            key = f"{what}:{type(exc).__name__}"
            self.errors[key] = self.errors.get(key, 0) + 1

    async def publish(self, w: int) -> float:
        """One announce; the worker role's fallback when it stored on no node."""
        rec = self.record(w)
        self.records[w] = rec
        try:
            stored = await self.impl.publish(w, rec)
        except Exception as exc:
            self.errors[f"publish:{type(exc).__name__}"] = \
                self.errors.get(f"publish:{type(exc).__name__}", 0) + 1
            stored = 0
        self.count("announces")
        if stored <= 0:
            self.count("registrations")
            await self.coordinator_call("register", self.coord.register(rec.encode()))
        return stored

    async def lookup(self, i: int, svc: str, since: float = 0.0,
                     live: list[int] | None = None) -> tuple[float, float, int]:
        """(seconds, found share, dead workers returned). Found: live workers of ``svc``
        (or ``live``) asked about whose answer carried a record issued at or after
        ``since``. The caller's fallback rule applies to every lookup."""
        if live is None:
            live = [w for w in self.members[svc] if w not in self.dead]
        self.looked_up.add(i)
        t0 = time.perf_counter()
        try:
            asked, got = await asyncio.wait_for(self.impl.lookup(i, svc, live),
                                                max(1.0, min(30.0, self.left())))
        except Exception as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            asked, got = live, {}
        dt = time.perf_counter() - t0
        self.count("lookups")
        if not got or dt > DHT_TIMEOUT_S:
            self.count("registry_reads")
            await self.coordinator_call("registry", self.coord.registry(svc))
        found = sum(1 for w in asked if got.get(w, -1.0) >= since)
        return dt, found / len(asked), sum(1 for w in got if w in self.dead)

    def pick_service(self, k: int) -> str | None:
        """Every other lookup the largest service; never one with no live worker (None
        when no service has one)."""
        live = [s for s in self.services if any(w not in self.dead for w in self.members[s])]
        if not live:
            return None
        if live[0] == self.services[0] and (k % 2 == 0 or len(live) == 1):
            return live[0]
        return self.rng.choice(live[1:] or live)

    async def lookups(self, count: int, concurrency: int, cap: float,
                      since: float = 0.0) -> dict[str, Any]:
        lat_big: list[float] = []
        lat: list[float] = []
        found: list[float] = []
        found_big: list[float] = []
        stale: list[int] = []
        missed: list[float] = []
        sem = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + min(cap, max(0.0, self.left()))

        async def one(k: int) -> None:
            svc = self.pick_service(k)
            if svc is None:
                return
            async with sem:
                if time.monotonic() > deadline:
                    return
                dt, f, dead = await self.lookup(self.rng.choice(self.alive), svc, since)
            lat.append(dt)
            found.append(f)
            stale.append(dead)
            missed.append((1.0 - f) * sum(1 for w in self.members[svc] if w not in self.dead))
            if svc == self.services[0]:
                lat_big.append(dt)
                found_big.append(f)

        await asyncio.gather(*(one(k) for k in range(count)))
        return {"n": len(found), "skipped": count - len(found),
                "found": statistics.fmean(found) if found else 0.0,
                "all_found_share": sum(1 for f in found if f >= 1.0) / max(1, len(found)),
                "found_largest": statistics.fmean(found_big) if found_big else 0.0,
                "dead_returned_per_lookup": (statistics.fmean(stale) if stale and
                                             self.impl.sees_dead else float("nan")),
                "missed_live_per_lookup": statistics.fmean(missed) if missed else 0.0,
                "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                "largest_p50_ms": pct(lat_big, 50) * 1e3,
                "largest_p99_ms": pct(lat_big, 99) * 1e3} | self.in_rtts(
                    {"largest_p50": pct(lat_big, 50), "largest_p99": pct(lat_big, 99)})

    async def republish_round(self, spread: float, done: asyncio.Event | None = None) -> None:
        """Every live worker announces once, spread over ``spread`` seconds (the worker
        role's interval with its 0.9-1.1 jitter folded into the spread)."""
        live = [w for w in self.records if w not in self.dead]
        self.rng.shuffle(live)
        t0 = time.monotonic()
        tasks = []
        for k, w in enumerate(live):
            delay = t0 + spread * k / max(1, len(live)) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self.publish(w)))
        await asyncio.gather(*tasks)
        # a round that outlasts its interval (slow announces) delays the next one: the
        # republish no longer keeps its interval (issue 16's target)
        self.round_seconds.append(time.monotonic() - t0)
        if done is not None:
            done.set()

    async def republish_loop(self, rounds: list[int] | None = None) -> None:
        while self._republishing:
            if rounds is not None:
                rounds.append(1)
            await self.republish_round(self.args.republish)

    # -- phases -------------------------------------------------------------------
    async def run(self) -> None:
        await self.coord.start()
        self.health.start()
        self.budget_end = time.monotonic() + self.args.cap
        try:
            await self.phase_join()
            await self.phase_announce()
            await self.phase_lookups()
            await self.phase_rest()
            await self.phase_churn()
            await self.phase_partition()
        except OutOfTime:
            pass        # the phases not reached are reported as "did not finish"
        finally:
            self._republishing = False
            await self.health.stop()
            self._emit("coordinators", self.fallback)
            self._emit("extra", await self.impl.aextra(self.alive) |
                      {"lookup_errors": self.errors})
            for i in self.alive:
                self.impl.stop(i)
            await self.coord.stop()

    async def phase_join(self) -> None:
        """Node 0 first, then every other node through 3 nodes already joined, at most
        ``--join-wave`` at once and fewer while the loops lag (``scale_pace.Pacer``)."""
        impl = self.impl
        cpu0 = await impl.cpu()
        rss0 = await impl.rss()
        t0 = time.perf_counter()
        for i in range(self.n):
            await impl.make(i, self.world)
        addrs = [impl.addr(i) for i in range(self.n)]
        each: list[float] = []
        joined = [0]
        pacer = Pacer(self.health, self.args.join_wave)

        async def join(j: int) -> None:
            seeds = [addrs[k] for k in self.rng.sample(joined, min(3, len(joined)))]
            s = time.perf_counter()
            await impl.join(j, seeds)
            each.append(time.perf_counter() - s)
            joined.append(j)

        await paced(pacer, list(range(1, self.n)), join, lambda: self.check_time("join"),
                    "join")
        await asyncio.sleep(1.0)
        self.phase = "settle"       # its one full collection is not the join's loop lag
        await impl.settle()
        rss1 = await impl.rss()
        self.emit("join", {"seconds": time.perf_counter() - t0,
                           "memory_per_node_kb": (rss1 - rss0) / self.n / 1024,
                           "cpu_s": await impl.cpu() - cpu0,
                           "in_flight_peak": pacer.peak, "in_flight_last": pacer.limit,
                           "node_p50_ms": pct(each, 50) * 1e3,
                           "node_p99_ms": pct(each, 99) * 1e3}
                  | self.in_rtts({"node_p50": pct(each, 50), "node_p99": pct(each, 99)}))

    async def phase_announce(self) -> None:
        workers = list(range(self.args.workers))
        for rnd in ("announce", "republish"):
            self.check_time(rnd)
            self.phase = rnd
            d0, b0 = await self.snap()
            t = time.perf_counter()
            pacer = Pacer(self.health, ANNOUNCE_PARALLEL)
            times: list[float] = []

            async def pub(w: int, times: list[float] = times) -> float:
                s = time.perf_counter()
                stored = await self.publish(w)
                times.append(time.perf_counter() - s)
                return stored

            stored = await paced(pacer, workers, pub, lambda rnd=rnd: self.check_time(rnd),
                                 rnd)
            d1, b1 = await self.snap()
            self.emit(rnd, {"seconds": time.perf_counter() - t, "in_flight_peak": pacer.peak,
                            "ok": sum(1 for s in stored if s > 0),
                            "on_k": sum(1 for s in stored if s >= KSIZE),
                            "mean_stored_per_key": statistics.fmean(stored),
                            "p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3,
                            "datagrams_per_announce": (d1 - d0) / len(workers),
                            "bytes_per_announce": (b1 - b0) / len(workers)}
                      | self.in_rtts({"p50": pct(times, 50), "p99": pct(times, 99)}))
        await asyncio.sleep(1.0)

    async def phase_lookups(self) -> None:
        a = self.args
        self.check_time("lookups")
        self.phase = "lookups"
        d0, b0 = await self.snap()
        x0 = await self.counters()
        c0 = await self.impl.cpu()
        res = await self.lookups(a.lookups, 1, a.phase_cap)
        d1, b1 = await self.snap()
        k = max(1, res["n"])
        x1 = await self.counters()
        res.update({"datagrams_per_lookup": (d1 - d0) / k, "bytes_per_lookup": (b1 - b0) / k,
                    "cpu_ms_per_lookup": (await self.impl.cpu() - c0) * 1e3 / k,
                    "retransmissions_per_lookup": ((x1["retransmissions"] -
                                                    x0["retransmissions"]) / k
                                                   if "retransmissions" in x1
                                                   else float("nan"))})
        self.emit("lookups", res)
        self.check_time("warm")
        self.emit("warm", await self.cold_warm(min(a.lookups, 100), a.phase_cap))
        self.check_time("concurrent")
        self.phase = "concurrent"
        t = time.perf_counter()
        conc = await self.lookups(a.concurrent * a.waves, a.concurrent, a.phase_cap)
        conc["lookups_per_s"] = conc["n"] / (time.perf_counter() - t)
        self.emit("concurrent", conc)

    async def cold_warm(self, count: int, cap: float) -> dict[str, Any]:
        """The largest service looked up twice in a row from nodes that never looked up
        anything: cold (first) and warm (second, what the node learned is used)."""
        self.phase = "warm"
        svc = self.services[0]
        fresh = [i for i in self.alive if i not in self.looked_up]
        self.rng.shuffle(fresh)
        cold: list[float] = []
        warm: list[float] = []
        found: list[float] = []
        deadline = time.monotonic() + min(cap, max(0.0, self.left()))
        for i in fresh[:count]:
            if time.monotonic() > deadline:
                break
            dt1, _f1, _ = await self.lookup(i, svc)
            dt2, f2, _ = await self.lookup(i, svc)
            cold.append(dt1)
            warm.append(dt2)
            found.append(f2)
        return {"n": len(cold), "warm_found": statistics.fmean(found) if found else 0.0,
                "cold_p50_ms": pct(cold, 50) * 1e3, "cold_p99_ms": pct(cold, 99) * 1e3,
                "warm_p50_ms": pct(warm, 50) * 1e3, "warm_p99_ms": pct(warm, 99) * 1e3} \
            | self.in_rtts({"cold_p50": pct(cold, 50), "cold_p99": pct(cold, 99),
                            "warm_p50": pct(warm, 50), "warm_p99": pct(warm, 99)})

    async def _rest_window(self, name: str, republish: bool) -> None:
        a = self.args
        self.phase = name
        rounds: list[int] = []
        if republish:
            self._republishing = True
            task = asyncio.ensure_future(self.republish_loop(rounds))
        d0, _ = await self.snap()
        r0 = (await self.impl.counts(self.world))[2]
        x0 = await self.counters()
        c0 = await self.impl.cpu()
        t = time.monotonic()
        await self.rest_sleep(a.rest)
        d1, _b, r1, _x = await self.impl.counts(self.world)
        dt = time.monotonic() - t
        cores = (await self.impl.cpu() - c0) / dt     # what the idle network costs here
        x1 = await self.counters()
        # every node is alive in the rests (the churn comes later): every contact removed
        # was a live one — false deaths, per contact held, per hour
        false_deaths = ((x1["contacts_removed"] - x0["contacts_removed"]) /
                        max(1.0, x0["routing_table_total"]) / (dt / 3600)
                        if "contacts_removed" in x1 else float("nan"))
        if republish:
            self._republishing = False
            await task        # the round in flight ends (its datagrams count after d1)
        rounds_s = self.round_seconds[-len(rounds):] if republish and rounds else []
        live = len(self.alive)
        self.emit(name, {"republish_round_s_max": max(rounds_s, default=float("nan")),
                         "cpu_cores": cores,"seconds": dt, "datagrams_per_s_per_node": (d1 - d0) / dt / live,
                         "refresh_rounds_per_node": (r1 - r0) / live,
                         "republish_rounds": len(rounds) if republish else 0,
                         "false_deaths_per_contact_hour": false_deaths,
                         "rss_mb": await self.impl.rss() / 2**20})

    async def phase_rest(self) -> None:
        """Two windows of ``--rest`` seconds with no client traffic: without the workers'
        republish, then (after one round that restores the records that expired in the
        quiet window) with it running at its interval. Table refreshes are counted."""
        await asyncio.sleep(2.0)
        period = self.args.refresh_interval
        if period is not None:
            self.impl.refresh_every(self.alive, period)
        try:
            await self._rest_window("rest_quiet", False)
            # records outlive no quiet window longer than their TTL (the agent's 300 s; a
            # kademlia value lives a week): one republish round brings every worker back
            # before the window with republish is measured and before the churn
            self.phase = "rest_republish"
            await self.republish_round(self.args.republish)
            await self._rest_window("rest_republish", True)
        finally:
            if period is not None:
                self.impl.refresh_every(self.alive, None)

    async def phase_churn(self) -> None:
        a = self.args
        self.check_time("churn")
        self.phase = "churn"
        victims = self.rng.sample(range(self.n), int(self.n * 0.3))
        for v in victims:
            self.impl.stop(v)
            self.dead.add(v)
        self.alive = [i for i in range(self.n) if i not in self.dead]
        self.emit("churn", await self.lookups(a.lookups // 2, a.churn_concurrency, a.phase_cap))
        self.check_time("churn_after_republish")
        self.phase = "churn_after_republish"
        t = time.perf_counter()
        await self.republish_round(a.republish)
        res = await self.lookups(a.lookups // 2, a.churn_concurrency, a.phase_cap)
        res["republish_round_s"] = time.perf_counter() - t
        self.emit("churn_after_republish", res)

    async def phase_partition(self) -> None:
        self.check_time("partition")
        self.phase = "partition"
        half = self.alive[:]
        self.rng.shuffle(half)
        side_a = set(half[: len(half) // 2])
        split_at = time.time()
        rounds0 = len(self.round_seconds)
        await self.impl.partition(self.world, {address(i): 0 if i in side_a else 1
                                               for i in self.alive})
        self._republishing = True
        first = asyncio.Event()
        loop_task = asyncio.ensure_future(self._split_republish(first))
        # every live worker republishes once inside the split before it is measured
        try:
            await asyncio.wait_for(first.wait(), max(1.0, self.left()))
        except TimeoutError:
            pass
        self.check_time("partition")
        own = await self._own_side(side_a, split_at)
        self.check_time("partition")
        self.emit("partition", {"seconds": time.time() - split_at, "own_side_found":
                                statistics.fmean(own) if own else 0.0, "lookups": len(own),
                                "all_republished": first.is_set(),
                                "dropped_datagrams": (await self.impl.counts(self.world))[3]})
        await self.impl.partition(self.world, None)
        self.phase = "heal"
        try:
            heal = await self._heal(split_at)
            heal["republish_round_s_max"] = max(self.round_seconds[rounds0:],
                                                default=float("nan"))
            self.emit("heal", heal)
        finally:
            self._republishing = False
            loop_task.cancel()

    async def _split_republish(self, first: asyncio.Event) -> None:
        await self.republish_round(self.args.republish, first)
        await self.republish_loop()

    async def _own_side(self, side_a: set[int], since: float) -> list[float]:
        """Found share of the lookup's own side's workers, counting only records issued
        since the split began."""
        own: list[float] = []
        sem = asyncio.Semaphore(self.args.churn_concurrency)
        deadline = time.monotonic() + min(self.args.phase_cap, max(0.0, self.left()))

        async def one(k: int) -> None:
            i = self.rng.choice(self.alive)
            svc = self.pick_service(k)
            if svc is None:
                return
            mine = [w for w in self.members[svc]
                    if w not in self.dead and (w in side_a) == (i in side_a)]
            if not mine:
                return
            async with sem:
                if time.monotonic() > deadline:
                    return
                _dt, found, _dead = await self.lookup(i, svc, since, mine)
            own.append(found)

        await asyncio.gather(*(one(k) for k in range(min(40, self.args.lookups))))
        return own

    async def _heal(self, since: float) -> dict[str, Any]:
        """Batches of lookups until one finds, for every live worker, a record issued
        since the split began (capped at 3 republish intervals)."""
        healed = time.monotonic()
        heal_s: float | None = None
        last: dict[str, Any] = {}
        batches = 0
        while time.monotonic() - healed < 3 * self.args.republish and self.left() > 0:
            last = await self.lookups(40, 20, self.args.phase_cap, since=since)
            batches += 1
            if last["n"] and last["found"] >= 1.0:
                heal_s = time.monotonic() - healed
                break
            await asyncio.sleep(1.0)
        if heal_s is None and self.left() <= 0:
            return {"did_not_finish": True, "last_batch_found": last.get("found")}
        return {"seconds_to_all_found": heal_s, "last_batch_found": last.get("found"),
                "batches": batches,
                "within_one_republish": heal_s is not None and heal_s <= self.args.republish}
