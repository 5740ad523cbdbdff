"""Load-balancing benchmark (issue 17 item 5): routed inference requests against GPU-like
servers, the agent's router next to the seed's policy, round robin, nginx ``least_conn``
and an oracle, on the same arrivals.

    python3 bench/balance.py [--seconds 20] [--loads 0.5,0.8,0.95] [--callers 4]
                             [--workers 8] [--mean-ms 500] [--max-concurrency queue|slots]
                             [--kind llamacpp|vllm|generic]
                             [--policies oracle,router,...] [--stream] [--quick] [--json]

Everything on 127.0.0.1, started by this script, torn down at the end:

* **servers**: one emulated GPU inference server per worker
  (:mod:`agent.cli.demo_inference`, in a thread of this process): ``slots`` requests at
  once, a FIFO queue of ``QUEUE_LIMIT`` (then 503 at once, like Ollama), lognormal
  service times (shape ``SIGMA``, mean ``--mean-ms`` at speed 1, capped at 20x the
  mean) divided by the server's speed, vLLM's ``/metrics``. Two of the eight carry
  "owner" load: the owner takes one slot every ~``OWNER_EVERY_S`` s (exponential) for
  ~``OWNER_HOLD_S`` s (exponential), ahead of queued requests.
* **workers**: one agent per server (``python -m agent run``), its gateway in front of
  the server as service ``llm`` with ``kind = "llamacpp"`` (``--kind``; ``generic``
  where this tree's config knows no kinds): the gateway reads the server's ``/slots``
  (the slot count becomes the announced capacity) and ``/metrics`` (queued requests);
  ``--kind vllm`` reads vLLM's gauges, which do not state the slots (capacity is then
  ``max_concurrency``). GPU class by speed. ``worker.max_concurrency`` = slots + queue
  by default: the gateway admits what the server can hold, and queueing happens in the
  server as with a real inference server; ``--max-concurrency slots`` makes the gateway
  refuse (``RMA-Not-Processed``) once every slot is taken, so nothing queues behind it.
* **callers**: ``--callers`` coordinator-role agents (the first is the DHT seed); every
  caller finds every worker through the DHT before the first cell.
* **nginx** (Debian's package; its row is skipped without it): one per caller,
  ``least_conn`` over the same gateways, keep-alive, ``proxy_next_upstream error timeout
  http_503 non_idempotent`` with 3 tries and ``max_fails=0`` (a 503 from a full queue
  must not take a server out for 10 s).

**Capacity model.** A server of speed ``v`` with ``k`` slots serves ``k * v / E[S]``
requests/s at saturation, ``E[S]`` the mean of the capped lognormal at speed 1 (exact,
:func:`capped_mean`); an owner holds one slot a share ``h / (e + h)`` of the time
(``e`` = mean interval, ``h`` = mean hold), so ``capacity = sum((k - owner share) * v) /
E[S]``. A load of 0.8 offers 0.8 x capacity, split evenly over the callers, each an
open-loop Poisson stream (the same arrival times for every policy of a load level).

**Policies** (:mod:`bench.balance_policies`): ``router`` (the caller's own
``/route/llm/...``: whatever this tree's router does), ``seed`` (the seed's policy —
random among the best three on announced load plus the caller's own outstanding count —
emulated in this process on the caller agent's own ranking, because the router has no
switch for it), ``round_robin``, ``nginx`` and ``oracle`` (one dispatcher for every
caller, exact state). ``seed``, ``round_robin`` and ``oracle`` send straight to the
gateways: one HTTP hop fewer than ``router`` and ``nginx``.

**Figures** per (load, policy): p50/p99/p99.9 latency of 200 answers, counted from the
scheduled arrival (not from when the dispatcher got to send it), throughput (200 answers
per second of the cell), 503s, other errors, retries (tries after the first:
``RMA-Attempts``, nginx's ``$upstream_addr`` list, or the bench's own retries), and
**to-full**: the share of requests that arrived at a server with no free slot (they
queued or were refused) while another server had one, from all servers' own logs
(:func:`agent.cli.demo_inference.sent_to_full`). Ratios against the oracle.

Targets (issue 17): at 0.8 load, router p99 <= 1.3x the oracle's, <= 0.5x the seed's,
<= nginx's; at 0.95, router throughput >= 0.95 of capacity and to-full <= 1 %.

Bounded: ``--seconds`` per cell plus at most ``DRAIN_S`` for its answers, every wait for
start-up bounded, loopback only. Two shared cores: callers, agents and servers share the
CPU; service times are hundreds of ms so the CPU is not the bottleneck, and the load
average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from balance_policies import (  # noqa: E402
    STREAM_BODY,
    NginxPolicy,
    OraclePolicy,
    Policy,
    RoundRobinPolicy,
    RouterPolicy,
    SeedPolicy,
    Target,
    arrivals,
    pct,
    run_cell,
)

from agent.cli.demo_inference import InferenceFarm, Profile, sent_to_full  # noqa: E402
from agent.config import ConfigError, parse_config, toml_dumps  # noqa: E402
from bench.pair import Procs, nginx_binary  # noqa: E402

QUEUE_LIMIT = 8
SIGMA = 0.8
CAP_FACTOR = 20.0
OWNER_EVERY_S, OWNER_HOLD_S = 20.0, 4.0
DRAIN_S = 60.0
START_TIMEOUT_S = 120.0
T0 = time.monotonic()
POLICIES = ("oracle", "router", "seed", "round_robin", "nginx")
# (slots, speed, owner) per worker, cycled: 8 workers of three speeds, 2-4 slots
POOL = ((4, 2.0, False), (2, 2.0, False), (3, 1.0, True), (2, 1.0, False),
        (4, 1.0, False), (3, 1.0, True), (2, 0.5, False), (2, 0.5, False))
GPU_BY_SPEED = {2.0: "H100", 1.0: "A100", 0.5: "T4"}


def capped_mean(mean: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X lognormal with mean ``mean`` and shape ``sigma``."""
    if sigma == 0:
        return min(mean, cap)
    mu = math.log(mean) - sigma * sigma / 2

    def phi(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    lc = math.log(cap)
    return mean * phi((lc - mu - sigma * sigma) / sigma) + cap * (1 - phi((lc - mu) / sigma))


@dataclass
class Setup:
    """What the cells run against."""

    farm: InferenceFarm
    targets: list[Target]
    callers: list[str]               # caller agents' admin URLs
    nginx: list[str]                 # one per caller (empty: no nginx)
    capacity: float                  # requests/s
    profiles: list[Profile]
    kind: str                        # the gateways' upstream kind: "vllm" or "generic"


def pool(workers: int, mean_ms: float) -> tuple[list[Profile], float]:
    """The servers' profiles and the pool's capacity (requests/s, the model above)."""
    profiles, total = [], 0.0
    for i in range(workers):
        slots, speed, owner = POOL[i % len(POOL)]
        profiles.append(Profile(name=f"w{i}", slots=slots, queue_limit=QUEUE_LIMIT,
                                speed=speed, mean_ms=mean_ms, sigma=SIGMA,
                                cap_factor=CAP_FACTOR, seed=100 + i,
                                owner_every_s=OWNER_EVERY_S if owner else 0.0,
                                owner_hold_s=OWNER_HOLD_S))
        share = OWNER_HOLD_S / (OWNER_EVERY_S + OWNER_HOLD_S) if owner else 0.0
        total += (slots - share) * speed
    es = capped_mean(mean_ms, SIGMA, CAP_FACTOR * mean_ms) / 1000.0
    return profiles, total / es


# ---------------------------------------------------------------------- processes
def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_json(url: str, ok: Any, timeout: float = START_TIMEOUT_S,
              headers: dict[str, str] | None = None) -> Any:
    """Poll ``url`` until ``ok(body)``; bounded."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=3) as r:
                last = json.loads(r.read() or b"null")
                if ok(last):
                    return last
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s (last: {last!r})")


def upstream_entry(url: str, kind: str) -> Any:
    """``{url, kind}`` when this tree's config knows upstream kinds, else the URL."""
    if kind == "generic":
        return url
    probe = toml_dumps({"agent": {"role": "worker", "state_dir": "/tmp"},
                        "gateway": {"listen": "127.0.0.1:1"},
                        "gateway.upstreams": {"llm": {"url": url, "kind": kind}},
                        "worker": {"services": ["llm"], "endpoint": "http://127.0.0.1:1"}})
    try:
        parse_config(probe)
    except ConfigError:
        return url
    return {"url": url, "kind": kind}


def agent_configs(tmp: Path, urls: list[str], profiles: list[Profile], callers: int,
                  with_queue: bool, kind: str) -> tuple[list[Path], list[str], list[str]]:
    """Config files (callers first), callers' admin URLs, workers' gateway URLs."""
    common = {"tunnel": {"mode": "off"}, "log": {"level": "warning"},
              "discovery": {"allow_private_hosts": ["127.0.0.1"]}}
    seed_udp = free_port(socket.SOCK_DGRAM)
    paths, caller_urls, gateways = [], [], []
    for c in range(callers):
        http = free_port()
        dht: dict[str, Any] = {"listen": f"127.0.0.1:{seed_udp if c == 0 else free_port(socket.SOCK_DGRAM)}",
                               "mode": "server"}
        if c:
            dht["bootstrap"] = [f"127.0.0.1:{seed_udp}"]
        p = tmp / f"caller{c}.toml"
        p.write_text(toml_dumps({
            "agent": {"role": "coordinator", "name": f"caller{c}",
                      "state_dir": str(tmp / f"s-caller{c}")}, "dht": dht,
            "http": {"listen": f"127.0.0.1:{http}"},
            "gateway": {"listen": f"127.0.0.1:{free_port()}"}, **common}))
        paths.append(p)
        caller_urls.append(f"http://127.0.0.1:{http}")
    for prof, url in zip(profiles, urls, strict=True):
        gw = free_port()
        p = tmp / f"{prof.name}.toml"
        p.write_text(toml_dumps({
            "agent": {"role": "worker", "name": prof.name, "state_dir": str(tmp / f"s-{prof.name}")},
            "dht": {"listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "mode": "server",
                    "bootstrap": [f"127.0.0.1:{seed_udp}"]},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "gateway": {"listen": f"127.0.0.1:{gw}"},
            "gateway.upstreams": {"llm": upstream_entry(url, kind)},
            "worker": {"services": ["llm"], "endpoint": f"http://127.0.0.1:{gw}",
                       "max_concurrency": prof.slots + (prof.queue_limit if with_queue
                                                        else 0),
                       "gpu": GPU_BY_SPEED.get(prof.speed, "A100"), "gpu_memory_gb": 40},
            **common}))
        paths.append(p)
        gateways.append(f"http://127.0.0.1:{gw}")
    return paths, caller_urls, gateways


NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream gateways {{ least_conn; {servers} keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_503 non_idempotent;
      proxy_next_upstream_tries 3;
      add_header X-Upstream-Addr $upstream_addr always;
    }}
  }}
}}
"""


def start(args: argparse.Namespace, tmp: Path, procs: Procs, farm: InferenceFarm) -> Setup:
    """Servers, agents and nginx; until every caller finds every worker."""
    profiles, capacity = pool(args.workers, args.mean_ms)
    urls = [farm.add(p) for p in profiles]
    paths, callers, gateways = agent_configs(tmp, urls, profiles, args.callers,
                                             args.max_concurrency == "queue", args.kind)
    for i, p in enumerate(paths):     # the DHT seed first, then everyone else at once
        procs.spawn([sys.executable, "-m", "agent", "run", "-c", str(p)], p.stem + ".log")
        if i == 0:
            wait_json(callers[0] + "/readyz", lambda b: True)
    for c in callers:
        wait_json(c + "/readyz", lambda b: True)
        wait_json(c + "/api/services/llm?limit=50",
                  lambda b: isinstance(b, dict) and len(b.get("workers", [])) == args.workers,
                  headers={"Cache-Control": "no-cache"})
    nginx, binary = [], nginx_binary()
    if binary is None:
        print("nginx not found: its rows are skipped (apt-get install nginx)", file=sys.stderr)
    for c in range(len(callers) if binary else 0):
        d, port = tmp / f"nginx{c}", free_port()
        d.mkdir()
        servers = " ".join(f"server {g.removeprefix('http://')} max_fails=0;" for g in gateways)
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, servers=servers))
        procs.spawn([binary, "-p", str(d), "-c", str(d / "nginx.conf")], f"nginx{c}.log")
        nginx.append(f"http://127.0.0.1:{port}")
    targets = [Target(p.name, g, p.slots, p.speed, s)
               for p, g, s in zip(profiles, gateways, farm.servers, strict=True)]
    entry = upstream_entry(urls[0], args.kind)
    kind = entry["kind"] if isinstance(entry, dict) else "generic"
    return Setup(farm, targets, callers, nginx, capacity, profiles, kind)


async def warm_up(setup: Setup, session: aiohttp.ClientSession) -> None:
    """Each caller's router proves and reaches every worker once; each nginx answers."""
    quick = {"X-Emu-Service-Ms": "1"}
    for c in setup.callers:
        for _ in range(2 * len(setup.targets)):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{c}/route/llm/v1/completions", headers=quick) as r:
                    await r.read()
    print(f"started in {time.monotonic() - T0:.1f} s", file=sys.stderr, flush=True)
    for n in setup.nginx:
        for _ in range(3):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{n}/llm/v1/completions", headers=quick) as r:
                    await r.read()


def make_policy(name: str, setup: Setup, session: aiohttp.ClientSession) -> Policy | None:
    if name == "nginx":
        return NginxPolicy(session, setup.targets, setup.callers, setup.nginx) \
            if setup.nginx else None
    cls = {"oracle": OraclePolicy, "router": RouterPolicy, "seed": SeedPolicy,
           "round_robin": RoundRobinPolicy}[name]
    return cls(session, setup.targets, setup.callers)


def with_body(policy: Policy | None, stream: bool) -> Policy | None:
    if policy is not None and stream:
        policy.body = STREAM_BODY
    return policy


def figures(setup: Setup, cell: Any, load: float) -> dict[str, Any]:
    logs = setup.farm.call(lambda: {s.profile.name: (s.profile.slots, list(s.log))
                                    for s in setup.farm.servers})
    bad, counted = sent_to_full(logs, since=cell.start)
    ok = len(cell.latencies)
    return {"load": load, "sent": cell.sent, "ok": ok,
            "p50_ms": pct(cell.latencies, 0.5) * 1000, "p99_ms": pct(cell.latencies, 0.99) * 1000,
            "p999_ms": pct(cell.latencies, 0.999) * 1000,
            "first_byte_p50_ms": pct(cell.first_byte, 0.5) * 1000,
            "first_byte_p99_ms": pct(cell.first_byte, 0.99) * 1000,
            "throughput": ok / cell.seconds, "of_capacity": ok / cell.seconds / setup.capacity,
            "s503": cell.statuses.get("503", 0),
            "errors": sum(n for k, n in cell.statuses.items() if k not in ("200", "503")),
            "retries": cell.retries, "unfinished": cell.unfinished,
            "to_full": bad / counted if counted else 0.0, "server_requests": counted,
            **spread(logs, cell.start)}


def spread(logs: dict[str, tuple[int, list[Any]]], since: float) -> dict[str, Any]:
    """Where the cell's requests went (per server) and how long they queued there (p50,
    p99 of start - arrival over the requests that got a slot): the "why" of a p99."""
    by_server: dict[str, int] = {}
    waits: list[float] = []
    for name, (_slots, entries) in logs.items():
        mine = [e for e in entries if e.kind == "request" and e.arrival >= since]
        by_server[name] = len(mine)
        waits += [e.start - e.arrival for e in mine if e.start == e.start]   # not nan
    return {"by_server": by_server, "queued_p50_ms": pct(waits, 0.5) * 1000,
            "queued_p99_ms": pct(waits, 0.99) * 1000}


async def run_all(args: argparse.Namespace, setup: Setup) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await warm_up(setup, session)
        for li, load in enumerate(args.loads):
            schedule = arrivals(load * setup.capacity, args.seconds, len(setup.callers),
                                seed=1000 + li)
            for name in args.policies:
                policy = with_body(make_policy(name, setup, session), args.stream)
                if policy is None:
                    continue
                print(f"load {load:.2f}: {name} ({len(schedule)} requests, "
                      f"{args.seconds:g} s) ...", file=sys.stderr, flush=True)
                cell = await run_cell(policy, schedule, args.seconds, DRAIN_S)
                results[f"{load:g}/{name}"] = {"policy": name, **figures(setup, cell, load)}
                await asyncio.sleep(args.rest)
    return results


def report(results: dict[str, dict[str, Any]], setup: Setup, args: argparse.Namespace,
           loadavg: tuple[float, float]) -> None:
    """The table for people (stderr with --json) and the targets."""
    slots = sum(p.slots for p in setup.profiles)
    print(f"balance benchmark: {len(setup.targets)} workers ({slots} slots, speeds "
          f"{sorted({p.speed for p in setup.profiles})}), {len(setup.callers)} callers, "
          f"capacity {setup.capacity:.1f} req/s (mean service {args.mean_ms:g} ms at speed 1, "
          f"lognormal sigma {SIGMA}), max_concurrency = {args.max_concurrency}, upstream "
          f"kind {setup.kind}, "
          f"{args.seconds:g} s per cell; load average "
          f"{loadavg[0]:.1f} at start, {loadavg[1]:.1f} at end")
    print(f"{'load':>5} {'policy':<12} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'req/s':>7} {'x cap':>6} {'503':>5} {'retry':>6} {'err':>4} "
          f"{'to-full':>8} {'p99/orc':>8}")
    for r in results.values():
        orc = results.get(f"{r['load']:g}/oracle")
        ratio = r["p99_ms"] / orc["p99_ms"] if orc and orc["p99_ms"] > 0 else math.nan
        print(f"{r['load']:5.2f} {r['policy']:<12} {r['ok']:6d} {r['p50_ms']:8.0f} "
              f"{r['p99_ms']:8.0f} {r['p999_ms']:9.0f} {r['throughput']:7.1f} "
              f"{r['of_capacity']:6.2f} {r['s503']:5d} {r['retries']:6d} "
              f"{r['errors'] + r['unfinished']:4d} {100 * r['to_full']:7.1f}% {ratio:8.2f}")
    names = [p.name for p in setup.profiles]
    print("where requests went (% per server: " + ", ".join(
        f"{p.name} {p.slots}x{p.speed:g}" for p in setup.profiles)
        + ") and how long they queued there (ms p50 / p99):")
    for r in results.values():
        total = max(1, sum(r["by_server"].values()))
        shares = " ".join(f"{100 * r['by_server'].get(n, 0) / total:4.0f}" for n in names)
        print(f"{r['load']:5.2f} {r['policy']:<12} {shares}   "
              f"{r['queued_p50_ms']:6.0f} / {r['queued_p99_ms']:6.0f}")
    if args.stream:
        print("first byte of the token stream, ms from the scheduled arrival (p50 / p99):")
        for r in results.values():
            print(f"{r['load']:5.2f} {r['policy']:<12} {r['first_byte_p50_ms']:8.0f} "
                  f"{r['first_byte_p99_ms']:8.0f}")
    for line in targets(results):
        print(line)


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, each with its figure and met / NOT met."""
    out = []

    def get(load: str, name: str) -> dict[str, Any] | None:
        return results.get(f"{load}/{name}")

    r, o, s, n = (get("0.8", p) for p in ("router", "oracle", "seed", "nginx"))
    if r and o:
        v = r["p99_ms"] / o["p99_ms"]
        out.append(f"target 0.8: router p99 <= 1.3x oracle: {v:.2f}x -> "
                   f"{'met' if v <= 1.3 else 'NOT met'}")
    if r and s:
        v = r["p99_ms"] / s["p99_ms"]
        out.append(f"target 0.8: router p99 <= 0.5x seed: {v:.2f}x -> "
                   f"{'met' if v <= 0.5 else 'NOT met'}")
    if r and n:
        v = r["p99_ms"] / n["p99_ms"]
        out.append(f"target 0.8: router p99 <= nginx least_conn: {v:.2f}x -> "
                   f"{'met' if v <= 1.0 else 'NOT met'}")
    r = get("0.95", "router")
    if r:
        out.append(f"target 0.95: router throughput >= 0.95 of capacity: "
                   f"{r['of_capacity']:.3f} -> {'met' if r['of_capacity'] >= 0.95 else 'NOT met'}")
        out.append(f"target 0.95: router to-full <= 1 %: {100 * r['to_full']:.1f} % -> "
                   f"{'met' if r['to_full'] <= 0.01 else 'NOT met'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per (load, policy) cell")
    ap.add_argument("--loads", default="0.5,0.8,0.95")
    ap.add_argument("--callers", type=int, default=4)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mean-ms", type=float, default=500.0)
    ap.add_argument("--max-concurrency", choices=("queue", "slots"), default="queue",
                    help="workers' max_concurrency: slots + queue (default) or slots")
    ap.add_argument("--kind", choices=("llamacpp", "vllm", "generic"), default="llamacpp",
                    help="the gateways' upstream kind (generic where the config has none)")
    ap.add_argument("--rest", type=float, default=1.0, help="seconds between cells")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--stream", action="store_true",
                    help="answers are token streams (SSE); first-byte p50/p99 reported too")
    ap.add_argument("--quick", action="store_true",
                    help="smoke size: 3 workers, 2 callers, load 0.8, 1.5 s cells")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.workers, args.callers, args.seconds = 3, 2, 1.5
        args.loads, args.mean_ms, args.rest = "0.8", 200.0, 0.2
    args.loads = [float(x) for x in args.loads.split(",")]
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = set(args.policies) - set(POLICIES)
    if unknown or not (1 <= args.workers <= 64 and 1 <= args.callers <= 16):
        ap.error(f"policies are {', '.join(POLICIES)}; 1-64 workers, 1-16 callers")
    procs = Procs("rma-bench-balance-")
    tmp = procs.tmp
    farm = InferenceFarm()
    load0 = os.getloadavg()[0]
    try:
        try:
            setup = start(args, tmp, procs, farm)
        except RuntimeError:
            for log in sorted(tmp.glob("*.log")):       # what the agents said, then fail
                tail = log.read_text(errors="replace").splitlines()[-6:]
                if tail:
                    print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            raise
        results = asyncio.run(run_all(args, setup))
    finally:
        procs.stop()
        farm.close()
        shutil.rmtree(tmp, ignore_errors=True)
    loadavg = (load0, os.getloadavg()[0])
    if args.json:
        settings = {k: getattr(args, k) for k in ("seconds", "loads", "callers", "workers",
                                                  "mean_ms", "max_concurrency", "stream",
                                                  "kind")}
        print(json.dumps({"capacity": setup.capacity, "load_average": loadavg,
                          "settings": settings, "kind": setup.kind,
                          "cells": results, "targets": targets(results)}, indent=2))
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report(results, setup, args, loadavg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
