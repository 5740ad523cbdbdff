"""A node joins and announces on an idle WAN: how long until it is ready, how long until
its first record sits on all k closest nodes, and what that costs (issue 16's targets:
ready <= 3 RTT + 1 s after start, first announce on all k closest <= 3 RTT at p50).

    python3 bench/announce.py                       (N = 100, 8 joiners, global)
    python3 bench/announce.py --nodes 300 --joiners 16 --wan continent --json

How: ``--nodes`` nodes are built and joined as ``bench/scale.py`` joins them (its
``Scenario.phase_join``, same pacing), every datagram delayed (and, on a lossy profile,
lost) by ``bench/wan.py``'s model at the sender (``scale_net.Tap``). Then ``--joiners``
more nodes, one at a time on the otherwise idle network, each bootstrap through 3
random built nodes and, as soon as the bootstrap returns, announce one signed record of
a service of their own. Per joiner: the join's duration (``bootstrap`` until it
returns: the node knows its neighbourhood), the announce's duration (until ``announce``
returns: every store answered), the store requests the joiner sent (``announce`` RPCs
for the agent, ``store`` for kademlia) and every datagram any node sent meanwhile, and
whether the record sits on *all* k closest nodes of each of its keys — the true k
closest, computed from the ids of every node running, checked in their storage.

Latencies are also given in RTTs: the profile's median pairwise RTT (jitter included)
over these hosts, printed in the header. Plain ``kademlia`` (``Server.bootstrap`` and
``Server.set`` step for step: ``scale_net.kademlia_set``) runs the same network, seed
and joiners in the same invocation; the ratio row is agent / kademlia. Each
implementation runs in its own event loop, one after the other, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_net import RMA, Impl, Plain, pct
from scale_phases import Scenario
from wan import PROFILES, Wan

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord

KSIZE = 20


def count_calls(obj: Any, name: str, box: list[int]) -> None:
    """Count every call of ``obj.name`` (an async method) in ``box[0]``."""
    inner = getattr(obj, name)

    async def counted(*args: Any, **kw: Any) -> Any:
        box[0] += 1
        return await inner(*args, **kw)

    setattr(obj, name, counted)


def closest(ids: dict[int, bytes], key: bytes, k: int) -> list[int]:
    """The k node indices whose ids are closest to ``key`` (XOR)."""
    t = int.from_bytes(key, "big")
    return sorted(ids, key=lambda i: int.from_bytes(ids[i], "big") ^ t)[:k]


class Probe:
    """What one implementation is asked: store requests counter, keys of a record, and
    whether a node holds it."""

    def __init__(self, impl: Impl) -> None:
        self.impl = impl
        self.plain = isinstance(impl, Plain)

    def watch(self, i: int, box: list[int], sent: list[int]) -> None:
        """Count node ``i``'s store requests in ``box`` and every datagram it sends in
        ``sent`` (its transport is a ``scale_net.Tap``)."""
        node = self.impl.nodes[i]
        count_calls(node.protocol, "call_store" if self.plain else "call_announce", box)
        tap = node.protocol.transport
        inner = tap.sendto

        def sendto(data: bytes, addr: Any = None) -> None:
            sent[0] += 1
            inner(data, addr)

        tap.sendto = sendto

    def node_id(self, i: int) -> bytes:
        node = self.impl.nodes[i]
        return node.node.id

    def keys(self, i: int, rec: WorkerRecord) -> list[bytes]:
        if self.plain:
            from kademlia.utils import digest
            return [digest(f"{rec.services[0]}:{i}")]
        return rec.keys()

    def holds(self, j: int, key: bytes, rec: WorkerRecord) -> bool:
        node = self.impl.nodes[j]
        if self.plain:
            return key in node.storage.data
        return any(r.worker_id == rec.worker_id for r in node.storage.snapshot(key))


def scenario_args(args: argparse.Namespace) -> argparse.Namespace:
    """What ``Scenario`` reads to build and join the network (no workers announce)."""
    return argparse.Namespace(nodes=args.nodes, workers=1, services=1, largest=0,
                              seed=args.seed, cap=args.cap, join_wave=args.join_wave,
                              ttl=600.0, republish=300.0)


async def one_joiner(sc: Scenario, probe: Probe, i: int,
                     seeds: list[tuple[str, int]]) -> dict[str, Any]:
    """Node ``i`` joins through ``seeds`` and announces at once; its figures."""
    impl = sc.impl
    await impl.make(i, sc.world)
    t0 = time.perf_counter()
    await impl.join(i, seeds)
    join_s = time.perf_counter() - t0
    rec = WorkerRecord.create(
        impl.idents[i], name=f"j{i}", services=(f"fresh{i:05d}",),
        endpoint=f"https://j{i}.example.org", gpu="A100", gpu_memory_gb=80, load=0.0,
        capacity=4, region="eu", ttl=600.0, refresh=300.0)
    stores, sent = [0], [0]
    probe.watch(i, stores, sent)
    d0 = sc.world.datagrams
    t1 = time.perf_counter()
    stored = await impl.publish(i, rec)
    ann_s = time.perf_counter() - t1
    datagrams = sc.world.datagrams - d0
    ids = {j: probe.node_id(j) for j in impl.nodes}
    keys = probe.keys(i, rec)
    covered = [sum(1 for j in closest(ids, key, KSIZE) if probe.holds(j, key, rec))
               for key in keys]
    return {"join_s": join_s, "announce_s": ann_s, "stored_per_key": stored,
            "store_requests": stores[0], "datagrams": datagrams, "sent": sent[0],
            "covered": covered,
            "all_k": all(c >= min(KSIZE, len(ids)) for c in covered)}


async def measure(impl: Impl, args: argparse.Namespace, wan: Wan | None) -> dict[str, Any]:
    """Build the network, then the joiners one at a time; the summary."""
    built: dict[str, Any] = {}
    sc = Scenario(impl, scenario_args(args), lambda ph, d: built.__setitem__(ph, d), wan)
    sc.budget_end = time.monotonic() + args.cap
    await sc.phase_join()
    await asyncio.sleep(args.idle)      # the build's own after-effects die down
    addrs = [impl.addr(i) for i in range(args.nodes)]
    rng = random.Random(args.seed + 1)
    probe = Probe(impl)
    rows = []
    try:
        for j in range(args.joiners):
            i = args.nodes + j
            seeds = [addrs[k] for k in rng.sample(range(args.nodes), min(3, args.nodes))]
            rows.append(await asyncio.wait_for(one_joiner(sc, probe, i, seeds), args.cap))
            await asyncio.sleep(args.idle)
    finally:
        for i in list(impl.nodes):
            impl.stop(i)
    return summarise(rows, sc.rtt_s) | {"build_join_s": built.get("join", {}).get("seconds"),
                                        "joiners": rows}


def summarise(rows: list[dict[str, Any]], rtt_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("join", "announce"):
        xs = [r[f"{name}_s"] for r in rows]
        for p in (50, 99):
            out[f"{name}_p{p}_ms"] = pct(xs, p) * 1e3
            if rtt_s:
                out[f"{name}_p{p}_rtt"] = pct(xs, p) / rtt_s
    n = max(1, len(rows))
    out["store_requests_per_announce"] = sum(r["store_requests"] for r in rows) / n
    out["store_requests_per_key"] = sum(r["store_requests"] / len(r["covered"])
                                        for r in rows) / n
    out["datagrams_per_announce"] = sum(r["datagrams"] for r in rows) / n
    out["sent_per_announce"] = sum(r["sent"] for r in rows) / n
    out["all_k_share"] = sum(1 for r in rows if r["all_k"]) / n
    out["mean_covered_per_key"] = (sum(sum(r["covered"]) / len(r["covered"]) for r in rows)
                                   / n)
    return out


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    random.seed(args.seed)
    total = args.nodes + args.joiners
    idents = [Identity.from_private_bytes(rng.randbytes(32)) for _ in range(total)]
    impl: Impl = RMA(idents) if name == "rma" else Plain(idents, args.kademlia_timeout, 0)
    wan = Wan(PROFILES[args.wan], total, seed=args.seed) if args.wan != "none" else None
    return uvloop.run(measure(impl, args, wan))


ROWS = [("join_p50_ms", "join p50 ms", 0), ("join_p99_ms", "join p99 ms", 0),
        ("join_p50_rtt", "join p50, RTTs", 2), ("join_p99_rtt", "join p99, RTTs", 2),
        ("announce_p50_ms", "first announce p50 ms", 0),
        ("announce_p99_ms", "first announce p99 ms", 0),
        ("announce_p50_rtt", "first announce p50, RTTs", 2),
        ("announce_p99_rtt", "first announce p99, RTTs", 2),
        ("all_k_share", "announces on all k closest (share)", 3),
        ("mean_covered_per_key", "true k closest holding it, mean per key", 1),
        ("store_requests_per_announce", "store requests per announce", 1),
        ("store_requests_per_key", "store requests per key (agent: 2 keys)", 1),
        ("sent_per_announce", "datagrams the announcer sent", 1),
        ("datagrams_per_announce", "datagrams meanwhile, all nodes (see below)", 1)]


def report(res: dict[str, dict[str, Any]], args: argparse.Namespace, rtt: dict[str, float],
           out: Any = sys.stdout) -> None:
    """The table (to stderr under ``--json``, whose stdout is the JSON line)."""
    def print(*a: Any) -> None:
        builtins.print(*a, file=out)

    print(f"N = {args.nodes} built, {args.joiners} joiners one at a time, --wan {args.wan}: "
          f"pairwise RTT median {rtt.get('median_rtt_ms', float('nan')):.0f} ms, "
          f"p99 {rtt.get('p99_rtt_ms', float('nan')):.0f} ms; seed {args.seed}; "
          f"k = {KSIZE}")
    names = list(res)
    print(f"{'':44}" + "".join(f"{n:>12}" for n in names)
          + (f"{'ratio':>9}" if len(names) == 2 else ""))
    for key, label, digits in ROWS:
        vals = [res[n].get(key) for n in names]
        cells = "".join(f"{v:>12.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>12}"
                        for v in vals)
        ratio = ""
        if len(vals) == 2 and all(isinstance(v, (int, float)) for v in vals) and vals[1]:
            ratio = f"{vals[0] / vals[1]:>9.2f}"
        print(f"{label:44}{cells}{ratio}")
    print("(all nodes: the network's after-effects of the join, e.g. verifying the "
          "newcomer and handing it keys, fall in the announce's window too)")
    print("ratio = agent / kademlia (lower is better for times and requests); "
          "kademlia's RPC timeout is fixed at "
          f"{args.kademlia_timeout:g} s; the agent's is adaptive per peer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--joiners", type=int, default=8)
    ap.add_argument("--wan", choices=[*sorted(PROFILES), "none"], default="global")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=("rma", "kademlia"))
    ap.add_argument("--idle", type=float, default=2.0,
                    help="s of quiet after the build and after each joiner")
    ap.add_argument("--join-wave", type=int, default=50)
    ap.add_argument("--cap", type=float, default=600.0, help="s for the build, and per joiner")
    ap.add_argument("--kademlia-timeout", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    logging.getLogger("agent").setLevel(logging.ERROR)
    rtt = (Wan(PROFILES[args.wan], args.nodes + args.joiners, seed=args.seed).rtt_stats()
           if args.wan != "none" else {})
    res = {name: run_one(name, args) for name in ("rma", "kademlia")
           if args.only in (None, name)}
    report(res, args, rtt, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"args": vars(args), "rtt": rtt, "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
