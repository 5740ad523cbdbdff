"""The DHT at the platform's size: N nodes, W workers over S services, churn, a partition.

    python3 bench/scale.py --nodes 1000 --workers 200 --services 1
    python3 bench/scale.py --nodes 5000 --workers 2000 --services 20 --largest 1000
    python3 bench/scale.py --wan global-lossy --procs 2     (issue 16: a WAN, P processes)
    (add --json for machine-readable output, --only rma|kademlia, --rest 900)

``--wan PROFILE`` (``bench/wan.py``: lan, continent, global, global-lossy): every node gets
a region and a home access delay; every datagram, both directions, leaves its sender's
transport after the pair's one-way delay plus jitter (``loop.call_later``), or is lost
(global-lossy: ~2 %, Gilbert-Elliott bursts). The RTTs are AWS inter-region figures
(source named in ``bench/wan.py``); the header prints the profile's median and p99
pairwise RTT and the latency rows are repeated in RTTs. ``--procs P``
(``scale_procs.py``): node i runs in shard process i % P, real UDP between them, the
scenario in a driver process; CPU and memory rows then sum all the processes.

Real code, real sockets: every node is the agent's own ``DHTNode`` (plain ``kademlia``
``Server`` for the baseline) on its own loopback address (127.x.y.z, one UDP socket each),
all in one process on uvloop. Each implementation runs in its own child process, one after
the other, under the same cap (``--cap`` seconds, the rests not counted); a phase it did not
reach within the cap is reported as "did not finish".

Phases (``scale_phases.py``; each also bounded by ``--phase-cap``):

1. **join** — nodes bootstrap in waves of 50 through already joined nodes; memory per node
   is RSS growth from creating and joining them, before any record, divided by N.
2. **announce** — worker w (node w, its own identity) announces its signed record; then a
   second round (the periodic republish). Reported: announces stored on at least one node,
   on k = 20 nodes (per key), mean nodes per key, datagrams per announce.
3. **lookups** — sequential lookups from random nodes, every other one for the largest
   service: found share, p50/p99, datagrams and bytes per lookup (every datagram any node
   sent during the phase, replies included, / lookups), CPU per lookup (this process's CPU,
   every node's work, / lookups); then waves of ``--concurrent`` lookups: lookups/s.
4. **rest** — two windows of ``--rest`` seconds without client traffic: without the
   workers' republish (the DHT's own upkeep: table refresh, liveness, handoff), then, after
   one round that restores the records that expired meanwhile, with the republish running
   every ``--republish`` seconds (what an idle network really sends). Each window
   reports how many table-refresh rounds per node it held: a window shorter than the
   refresh interval (the agent's 900 s; kademlia's 3600 s) may hold none.
5. **churn** — 30 % of the nodes stop without goodbye (their workers with them); lookups at
   once, then after one republish round of the live workers spread over ``--republish``.
6. **partition** — the live nodes split in two halves (datagrams between them dropped at
   the sender) while workers keep republishing; once every live worker has republished
   inside the split, lookups report what each side finds of its own side's workers; then
   the heal: batches of lookups from both sides until one batch finds, for every live
   worker, a record issued after the split began (pre-split copies do not count);
   capped at 3 republish intervals.

Throughout, a real HTTP server on 127.0.0.1 stands for the coordinators and the product's
fallback rules decide what reaches it (``scale_phases``): registrations per announce and
registry reads per lookup are reported for every phase.

Found share is recall (live workers found / live workers asked about); dead workers still
returned are reported apart (rma only). Plain ``kademlia`` holds one value per key, so its
lookup of a service is one ``get`` per worker: ``--baseline-gets`` of them sampled (5 by
default; 0 = all), and its found share, latency, datagrams, bytes and CPU per lookup cover
those gets only. Its RPC timeout is rpcudp's fixed 5 s unless ``--kademlia-timeout`` says
otherwise (the agent's is adaptive, 0.2-2 s, with hedged requests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_net import RMA, Impl, Plain, World
from scale_pace import LoopMeter, calm_gc
from scale_phases import Scenario
from scale_procs import Sharded, serve_shard
from wan import PROFILES, SOURCE, Wan

from agent.config import DHTSection
from agent.dht.identity import Identity


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
    impl: Impl = (RMA(idents) if only == "rma" else
                  Plain(idents, args.kademlia_timeout, args.baseline_gets))
    wan = Wan(PROFILES[args.wan], args.nodes, seed=args.seed) if args.wan else None
    if args.shard is not None:      # one shard of a --procs run: serve the driver
        uvloop.run(serve_shard(impl, World(wan)))
        return out
    if args.procs > 1:
        impl = Sharded(impl, args.procs, [__file__, *sys.argv[1:]])
    emit("setup", {"timeouts": impl.timeouts, "procs": args.procs,
                   "wan": None if wan is None else {"profile": args.wan, **wan.rtt_stats()}})

    async def scenario() -> None:
        calm_gc()
        impl.meter = LoopMeter()    # this process: the nodes' own, or the driver's
        impl.meter.start()
        try:
            await Scenario(impl, args, emit, wan).run()
        finally:
            if isinstance(impl, Sharded):
                if wan is not None:     # the shards' datagrams and losses
                    parts = await impl.wan_counts()
                    wan.sent, wan.lost = sum(p[0] for p in parts), sum(p[1] for p in parts)
                await impl.close()

    uvloop.run(scenario())
    if wan is not None:
        emit("wan", {"profile": args.wan, "datagrams": wan.sent, "lost": wan.lost,
                     "loss_share": wan.loss_share(), **wan.rtt_stats()})
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
    ("join", "node_p50_ms", "join: one node p50 ms", 0),
    ("join", "node_p99_ms", "join: one node p99 ms", 0),
    ("join", "node_p99_rtt", "join: one node p99, RTTs", 1),
    ("join", "memory_per_node_kb", "memory per node, KB (RSS, before records)", 1),
    ("announce", "ok", "announce: stored on >= 1 node (of W)", 0),
    ("announce", "on_k", "announce: stored on k = 20 nodes per key", 0),
    ("announce", "mean_stored_per_key", "announce: mean nodes stored per key", 1),
    ("announce", "p50_ms", "announce p50 ms", 1),
    ("announce", "p99_ms", "announce p99 ms", 1),
    ("announce", "p50_rtt", "announce p50, RTTs", 2),
    ("announce", "p99_rtt", "announce p99, RTTs", 2),
    ("announce", "datagrams_per_announce", "first announce: datagrams per announce", 1),
    ("republish", "datagrams_per_announce", "republish: datagrams per announce", 1),
    ("lookups", "found", "healthy: found share", 4),
    ("lookups", "found_largest", "healthy: found share, largest service", 4),
    ("lookups", "largest_p50_ms", "healthy: largest service p50 ms", 2),
    ("lookups", "largest_p99_ms", "healthy: largest service p99 ms", 2),
    ("lookups", "largest_p50_rtt", "healthy: largest p50, RTTs", 2),
    ("lookups", "largest_p99_rtt", "healthy: largest p99, RTTs", 2),
    ("lookups", "missed_live_per_lookup", "healthy: live workers missed per lookup", 3),
    ("warm", "cold_p50_ms", "largest, cold (node's first): p50 ms", 1),
    ("warm", "cold_p99_ms", "largest, cold: p99 ms", 1),
    ("warm", "warm_p50_ms", "largest, warm (same node again): p50 ms", 1),
    ("warm", "warm_p99_ms", "largest, warm: p99 ms", 1),
    ("warm", "cold_p50_rtt", "largest, cold p50, RTTs", 2),
    ("warm", "cold_p99_rtt", "largest, cold p99, RTTs", 2),
    ("warm", "warm_p50_rtt", "largest, warm p50, RTTs", 2),
    ("warm", "warm_p99_rtt", "largest, warm p99, RTTs", 2),
    ("warm", "warm_found", "largest, warm: found share", 4),
    ("lookups", "p50_ms", "healthy: all lookups p50 ms", 2),
    ("lookups", "datagrams_per_lookup", "datagrams per lookup", 1),
    ("lookups", "bytes_per_lookup", "bytes per lookup", 0),
    ("lookups", "retransmissions_per_lookup", "retransmissions per lookup (all nodes)", 2),
    ("lookups", "cpu_ms_per_lookup", "CPU ms per lookup (all nodes)", 2),
    ("concurrent", "lookups_per_s", "lookups/s, concurrent", 0),
    ("concurrent", "found", "concurrent: found share", 4),
    ("rest_quiet", "datagrams_per_s_per_node", "rest, no republish: datagrams/s/node", 3),
    ("rest_quiet", "refresh_rounds_per_node", "  table refresh rounds per node in it", 2),
    ("rest_quiet", "false_deaths_per_contact_hour", "  live contacts removed /contact/h", 4),
    ("rest_republish", "datagrams_per_s_per_node", "rest with republish: datagrams/s/node", 3),
    ("rest_republish", "refresh_rounds_per_node", "  table refresh rounds per node in it", 2),
    ("rest_quiet", "cpu_cores", "  CPU cores busy (all processes)", 2),
    ("rest_republish", "republish_rounds", "  republish rounds started in it", 0),
    ("rest_republish", "cpu_cores", "  CPU cores busy (all processes)", 2),
    ("rest_republish", "republish_round_s_max", "  longest republish round, s", 1),
    ("rest_republish", "false_deaths_per_contact_hour", "  live contacts removed /contact/h",
     4),
    ("churn", "found", "30 % churn: found share at once", 4),
    ("churn", "p99_ms", "30 % churn: p99 ms at once", 1),
    ("churn", "dead_returned_per_lookup", "30 % churn: dead workers returned/lookup", 2),
    ("churn_after_republish", "found", "churn: found after one republish", 4),
    ("churn_after_republish", "p99_ms", "churn: p99 ms after one republish", 1),
    ("partition", "own_side_found", "split: own side found (records since split)", 4),
    ("heal", "seconds_to_all_found", "heal: s until all found (records since split)", 1),
    ("heal", "last_batch_found", "heal: found share in the last batch", 4),
    ("heal", "republish_round_s_max", "split + heal: longest republish round, s", 1),
    ("extra", "tombstones_stored", "honest workers withdrawn (tombstones held)", 0),
    ("extra", "retransmissions", "retransmissions, whole run (all nodes)", 0),
    # the harness's own health (bench/scale_pace.py): figures measured on loops that ran
    # late are the harness's overload, not the DHT's
    ("join", "in_flight_peak", "join: most nodes joining at once (paced)", 0),
    ("join", "cpu_s", "join: CPU s (all processes)", 0),
    ("join", "loop_lag_p99_ms", "join: loop lag, worst 1 s p99, ms", 0),
    ("join", "loop_gc_max_ms", "join: longest GC pause ms", 0),
    ("announce", "loop_lag_p99_ms", "announce: loop lag, worst 1 s p99, ms", 0),
    ("lookups", "loop_lag_p99_ms", "lookups: loop lag, worst 1 s p99, ms", 0),
    ("rest_republish", "loop_lag_p99_ms", "rest with republish: loop lag, worst p99 ms", 0),
    ("heal", "loop_lag_p99_ms", "heal: loop lag, worst 1 s p99, ms", 0),
]
PHASES = ("announce", "republish", "lookups", "warm", "concurrent", "rest_quiet", "rest_republish",
          "churn", "churn_after_republish", "partition", "heal")


def fmt(v: Any, digits: int) -> str:
    if v is None:
        return "never"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def cell(data: dict[str, Any], phase: str, key: str, digits: int) -> str:
    if phase not in data or data[phase].get("did_not_finish"):
        return "did not finish"
    if key not in data[phase]:
        return "n/a"
    return fmt(data[phase][key], digits)


def coordinator_rows(results: dict[str, tuple[dict[str, Any], bool]]) -> list[tuple[str, list[str]]]:
    """Per phase: fallback registrations per announce, registry reads per lookup."""
    rows = []
    for phase in PHASES:
        cells = []
        for data, _fin in results.values():
            c = data.get("coordinators", {}).get(phase)
            if not c:
                cells.append("-")
                continue
            reg = f"{c['registrations']}/{c['announces']}" if c["announces"] else ""
            reads = f"{c['registry_reads']}/{c['lookups']}" if c["lookups"] else ""
            cells.append(" ".join(x for x in (f"reg {reg}" if reg else "",
                                              f"read {reads}" if reads else "") if x))
        rows.append((f"coordinator HTTP, {phase}", cells))
    return rows


def report(results: dict[str, tuple[dict[str, Any], bool]], args: argparse.Namespace) -> None:
    names = list(results)
    print(f"bench/scale.py  N={args.nodes} W={args.workers} S={args.services} "
          f"largest={args.largest or args.workers} republish={args.republish:g}s "
          f"ttl={args.ttl:g}s rest={args.rest:g}s x2 cap={args.cap:g}s (rests excluded, "
          f"same for both) load average {os.getloadavg()[0]:.2f}")
    for n in names:
        wn = results[n][0].get("wan") or results[n][0].get("setup", {}).get("wan")
        if wn:
            print(f"  {n}: --wan {wn['profile']}: pairwise RTT median "
                  f"{wn['median_rtt_ms']:.1f} ms, p99 {wn['p99_rtt_ms']:.1f} ms; datagrams "
                  f"lost {wn.get('loss_share', float('nan')):.4f} ({SOURCE})")
    for n in names:
        data, fin = results[n]
        print(f"  {n}: RPC timeouts {data.get('setup', {}).get('timeouts', '?')}; "
              f"{'finished' if fin else 'stopped at the cap or failed'}")
    if args.refresh_interval is not None:
        print(f"  --refresh-interval {args.refresh_interval:g}s: both implementations "
              f"refresh their tables at this period during the rests only (the agent's is "
              f"900 s, kademlia's 3600 s)")
    if "kademlia" in results:
        print(f"  kademlia: one get per worker, {args.baseline_gets or 'all'} sampled per "
              f"lookup; its found share, latency, datagrams, bytes and CPU cover those gets")
    w = 44
    print(f"{'metric':<{w}}" + "".join(f"{n:>22}" for n in names))
    for phase, key, label, digits in ROWS:
        if key.endswith("_rtt") and not any("wan" in results[n][0] or
                                             results[n][0].get("setup", {}).get("wan")
                                             for n in names):
            continue
        print(f"{label:<{w}}" + "".join(f"{cell(results[n][0], phase, key, digits):>22}"
                                         for n in names))
    print("coordinator HTTP under the product's fallback rules: reg = fallback registrations"
          "/announces, read = registry reads/lookups (DHT empty or slower than the caller's"
          " timeout)")
    for label, cells in coordinator_rows(results):
        print(f"{label:<{w}}" + "".join(f"{c:>22}" for c in cells))
    for n in names:
        errs = results[n][0].get("extra", {}).get("lookup_errors")
        if errs:
            print(f"  {n}: lookup/publish errors {errs}")


def main() -> int:
    dht = DHTSection()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--services", type=int, default=1)
    ap.add_argument("--largest", type=int, default=0, help="workers of the largest service")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--churn-concurrency", type=int, default=20)
    ap.add_argument("--republish", type=float, default=float(dht.republish_interval),
                    help="workers' republish interval (default: the agent's)")
    ap.add_argument("--ttl", type=float, default=float(dht.record_ttl),
                    help="record lifetime (default: the agent's record_ttl)")
    ap.add_argument("--rest", type=float, default=900.0,
                    help="each rest window, s (default 900: one agent table refresh)")
    ap.add_argument("--refresh-interval", type=float, default=None,
                    help="both implementations' table refresh period during the rests "
                         "(smoke tests; default: their own, 900 s and 3600 s)")
    ap.add_argument("--phase-cap", type=float, default=120.0)
    ap.add_argument("--cap", type=float, default=1800.0,
                    help="wall-clock cap per implementation, rests excluded, the same for both")
    ap.add_argument("--kademlia-timeout", type=float, default=5.0,
                    help="plain kademlia's RPC timeout (rpcudp's default 5 s)")
    ap.add_argument("--baseline-gets", type=int, default=5,
                    help="kademlia gets per service lookup (sampled workers; 0 = all)")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("BENCH_SEED", "1")))
    ap.add_argument("--only", choices=("rma", "kademlia"))
    ap.add_argument("--wan", choices=sorted(PROFILES),
                    help="every datagram delayed (region + home access + jitter) and, for "
                         "global-lossy, lost as bench/wan.py models (default: loopback)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--join-wave", type=int, default=50,
                    help="nodes joining at once, through nodes already joined (default 50; "
                         "over --wan each wave takes seconds: use a few hundred)")
    ap.add_argument("--procs", type=int, default=1,
                    help="shard the nodes over this many processes (real UDP between them)")
    ap.add_argument("--child", choices=("rma", "kademlia"), help=argparse.SUPPRESS)
    ap.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the table from earlier --json outputs (e.g. one --only rma "
                         "and one --only kademlia run; give the same size arguments)")
    args = ap.parse_args()
    if args.report:
        merged: dict[str, tuple[dict[str, Any], bool]] = {}
        for path in args.report:
            for name, data in json.loads(Path(path).read_text()).items():
                merged[name] = (data, bool(data.pop("finished", False)))
        report(merged, args)
        return 0
    if args.workers > args.nodes:
        ap.error("--workers must not exceed --nodes (worker w runs on node w)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.nodes + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.nodes + 1024), hard))
    if args.child:
        run_child(args, args.child)
        return 0
    results: dict[str, tuple[dict[str, Any], bool]] = {}
    # the rests and the settle pauses are outside the cap, for both alike
    wall = args.cap + 2 * args.rest + 4 * args.republish + 60
    for impl in ("rma", "kademlia"):
        if args.only and impl != args.only:
            continue
        results[impl] = run_impl(args, impl, wall)
    if args.json:
        print(json.dumps({n: {"finished": fin, **data} for n, (data, fin) in results.items()},
                         indent=1))
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
