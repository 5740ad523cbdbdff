"""Router attack benchmark (issue 20 item 2): while 1,000 routed requests hang on a hostile
worker, do routes to other workers keep their latency, and how much of the caller's router
does the hostile worker hold?

    python3 bench/attack_router.py [--hanging 1000] [--probes 300] [--seconds 45]
                                   [--settle 17] [--tree PATH] [--json]

Everything on 127.0.0.1, started by this script, torn down at the end:

* in a thread of this process: the good worker's upstream (``/ok`` answers 2 bytes at
  once) and the **hostile worker's endpoint**: ownership proofs are passed on to the
  hostile agent's real gateway (so they verify), every other request is held forever,
  with no connection limit (a hostile worker runs no honest gateway);
* a **caller** agent (coordinator role: the DHT seed), whose router is measured;
* a **good** worker agent serving ``ocr`` and a **hostile** worker agent announcing
  ``evil`` at the hostile endpoint with ``worker.max_concurrency = 10000``, both found by
  the caller through the DHT;
* the **attack**: ``--hanging`` concurrent ``GET /route/evil/hang`` on the caller, each on
  its own connection, held until answered or until ``--seconds`` are over;
* the **probes**: ``--probes`` ``GET /route/ocr/ok``, 8 at a time (10 s timeout each),
  before the attack and again while it holds, ``--settle`` seconds after it started
  (then for at most the rest of ``--seconds``): by then the router's idle connections to
  the good worker have expired (15 s), so it needs new ones from its pool.

Reported: the probes' p50/p99 before and during (and their ratio; target: p99 within 2x)
and failures; the most connections the caller's process held to the hostile worker's
endpoint at once (its own sockets, sampled from /proc every 0.2 s by another process:
the router's share plus discovery's proof probe) against the router's
pool of 512; how the hanging requests ended (503 shed at once, 404 once the worker was
backed off, or still hanging at the end); and whether the requests the hostile endpoint
held were dropped after the callers hung up. ``--tree`` runs the agents from another
source tree (e.g. ``git archive`` of the commit before the router's bounds) for the
"before" figures.

Bounded: at most ``--hanging`` + 1 connections, ``--probes`` x 2 requests, ``--seconds`` of
attack plus a fixed 30 s to settle; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
POOL = 512


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------- upstreams
class Upstreams:
    """On a background loop: the good worker's upstream (``/ok``) and the hostile
    worker's public face. That face is what the hostile worker announces as its endpoint:
    it passes ownership-proof requests on to the worker's real gateway (so its proof is
    valid) and holds every other request forever, without any connection limit — a
    hostile worker does not run an honest gateway. ``open`` = requests it holds."""

    def __init__(self) -> None:
        self.open = 0
        self.gateway = ""                 # the hostile worker's real gateway (for proofs)
        self.hostile_port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        self.runners.append(runner)

    async def _start(self) -> str:
        async def ok(_request: web.Request) -> web.Response:
            return web.Response(body=b"ok")

        async def hostile(request: web.Request) -> web.Response:
            if request.path == "/.well-known/rma-agent/proof":
                async with aiohttp.ClientSession() as s, \
                        s.get(self.gateway + request.path_qs) as r:
                    return web.Response(status=r.status, body=await r.read(),
                                        content_type="application/json")
            self.open += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.open -= 1
            raise AssertionError("unreachable")

        good = web.Application()
        good.router.add_get("/ok", ok)
        bad = web.Application()
        bad.router.add_route("*", "/{tail:.*}", hostile)
        port = _free_port()
        await self._serve(good, port)
        await self._serve(bad, self.hostile_port)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        async def stop() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


# ----------------------------------------------------------------------------- agents
class Agent:
    def __init__(self, tmp: Path, tree: Path, name: str, role: str, seeds: list[str],
                 worker: dict[str, Any] | None = None) -> None:
        self.name = name
        self.http, self.gw, udp = _free_port(), _free_port(), _free_port(socket.SOCK_DGRAM)
        self.dht = f"127.0.0.1:{udp}"
        lines = [f'[agent]\nrole = "{role}"\nname = "{name}"\nstate_dir = "{tmp / name}"',
                 f'[dht]\nlisten = "{self.dht}"\nbootstrap = {json.dumps(seeds)}\n'
                 'record_ttl = 60\nrepublish_interval = 5',
                 f'[http]\nlisten = "127.0.0.1:{self.http}"',
                 f'[gateway]\nlisten = "127.0.0.1:{self.gw}"\nupstream_timeout = 300',
                 '[discovery]\nallow_private_hosts = ["127.0.0.0/8"]',
                 '[log]\nlevel = "warning"']
        if worker is not None:
            lines[3] += f'\n[gateway.upstreams]\n{worker["service"]} = "{worker["url"]}"'
            endpoint = worker.get("endpoint", f"http://127.0.0.1:{self.gw}")
            lines.append(f'[worker]\nservices = ["{worker["service"]}"]\n'
                         f'endpoint = "{endpoint}"\n'
                         f'max_concurrency = {worker["max_concurrency"]}\n'
                         'gpu = "T4"\ngpu_memory_gb = 16')
        cfg = tmp / f"{name}.toml"
        cfg.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env["PYTHONPATH"] = str(tree)
        self.log = open(tmp / f"{name}.log", "wb")                      # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                                     cwd=tree, env=env, stdout=self.log, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.http}"

    def wait(self, path: str, ok: Any, what: str, limit: float = 120.0) -> Any:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                got = _get_json(self.url + path)
                if ok(got):
                    return got
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace")[-1500:]
        raise SystemExit(f"{self.name}: {what} did not happen; its log ends:\n{tail}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def connections_to(pid: int, port: int) -> int:
    """Established connections process ``pid`` holds to 127.0.0.1:``port``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
                if t.startswith("socket:["):
                    inodes.add(t[8:-1])
    want = f"0100007F:{port:04X}"
    n = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            p = line.split()
            if p[2] == want and p[3] == "01" and p[9] in inodes:
                n += 1
    return n


# ----------------------------------------------------------------------------- traffic
async def probe(port: int, n: int, until: float = float("inf"),
                concurrency: int = 8) -> dict[str, Any]:
    """``n`` routed GETs to the good worker, ``concurrency`` at a time, each on a fresh
    caller connection (so the router needs several connections to the good worker, not
    one kept alive); fewer if ``until`` (monotonic) comes first: a starved router makes
    each probe wait its 10 s timeout."""
    times: list[float] = []
    failed = 0
    left = n

    async def one() -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /route/ocr/ok HTTP/1.1\r\nHost: x\r\nConnection: close"
                             b"\r\n\r\n")
                data = await reader.read()
                writer.close()
        except (OSError, TimeoutError):
            failed += 1
            return
        if data.startswith(b"HTTP/1.1 200"):
            times.append((time.perf_counter() - t0) * 1000.0)
        else:
            failed += 1

    async def stream() -> None:
        nonlocal left
        while left > 0 and time.monotonic() < until:
            left -= 1
            await one()

    await asyncio.gather(*(stream() for _ in range(concurrency)))
    times.sort()

    def pct(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else None

    return {"ok": len(times), "failed": failed, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


async def hold(port: int, i: int, until: float, ends: dict[str, int]) -> None:
    """One hanging request to the hostile worker, held until answered or ``until``."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        ends["connect_failed"] += 1
        return
    try:
        writer.write(f"GET /route/evil/hang?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(max(0.1, until - time.monotonic())):
            head = await reader.readuntil(b"\r\n\r\n")
        ends[f"http_{int(head.split(b' ', 2)[1])}"] += 1
    except TimeoutError:
        ends["still_hanging"] += 1
    except (OSError, asyncio.IncompleteReadError):
        ends["closed"] += 1
    finally:
        writer.close()


async def attack(args: argparse.Namespace, caller: Agent, hostile: Agent,
                 ups: Upstreams) -> dict[str, Any]:
    until = time.monotonic() + args.seconds
    ends: defaultdict[str, int] = defaultdict(int)
    held = [asyncio.create_task(hold(caller.http, i, until, ends))
            for i in range(args.hanging)]
    most_open = 0

    async def watch_upstream() -> None:
        nonlocal most_open
        while time.monotonic() < until:
            most_open = max(most_open, ups.open)
            await asyncio.sleep(0.2)

    async def phase() -> dict[str, Any]:
        # the attack is in place, and the router's idle connections to the good worker
        # have expired (aiohttp keeps them 15 s): the probes need new ones, as a caller
        # coming back after a quiet moment, or a newly found worker, does
        await asyncio.sleep(args.settle)
        got = await probe(caller.http, args.probes, until)
        await asyncio.gather(*held)               # held to the end of --seconds
        return got

    watcher = asyncio.create_task(watch_upstream())
    during, most = await sampled(caller, ups, phase())
    await watcher
    return {"during": during, "ends": dict(ends), "upstream_open": most_open,
            "hostile_connections": most}


async def sampled(caller: Agent, ups: Upstreams, coro: Any) -> tuple[Any, int]:
    """``coro``'s result, and the most connections the caller held to the hostile worker
    meanwhile. Another process samples (reading /proc for ~1,000 sockets in this one would
    stall the probes' event loop); it runs during the "before" probes as well, so both
    phases pay the same for it."""
    sampler = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sample", str(caller.proc.pid), str(ups.hostile_port),
        stdout=asyncio.subprocess.PIPE)
    try:
        result = await coro
    finally:
        sampler.terminate()
    out, _ = await sampler.communicate()
    lines = out.split()
    return result, int(lines[-1]) if lines else 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    tree = Path(args.tree).resolve()
    ups = Upstreams()
    agents: list[Agent] = []
    with tempfile.TemporaryDirectory(prefix="attack-router-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            caller = Agent(tmp, tree, "caller", "coordinator", [])
            agents.append(caller)
            caller.wait("/api/dht/stats", lambda s: True, "caller start")
            good = Agent(tmp, tree, "good", "worker", [caller.dht],
                         {"service": "ocr", "url": ups.url, "max_concurrency": 64})
            hostile = Agent(tmp, tree, "hostile", "worker", [caller.dht],
                            {"service": "evil", "url": ups.url, "max_concurrency": 10000,
                             "endpoint": f"http://127.0.0.1:{ups.hostile_port}"})
            ups.gateway = f"http://127.0.0.1:{hostile.gw}"
            agents += [good, hostile]
            for svc in ("ocr", "evil"):
                caller.wait(f"/api/services/{svc}", lambda a: len(a["workers"]) == 1,
                            f"{svc} announced")
            asyncio.run(probe(caller.http, 20))                  # warm: proofs, caches
            before, _ = asyncio.run(sampled(caller, ups, probe(caller.http, args.probes)))
            result = asyncio.run(attack(args, caller, hostile, ups))
            # the callers have hung up: are the hostile upstream's requests dropped?
            deadline = time.monotonic() + 30
            while ups.open and time.monotonic() < deadline:
                time.sleep(0.2)
            detail = _get_json(caller.url + "/api/dht/stats").get("router_detail", {})
            p99b, p99d = before["p99_ms"], result["during"]["p99_ms"]
            return {"tree": str(tree), "hanging": args.hanging, "seconds": args.seconds,
                    "before": before, **result,
                    "p99_ratio": round(p99d / p99b, 2) if p99b and p99d else None,
                    "hostile_share_of_pool": round(result["hostile_connections"] / POOL, 3),
                    "upstream_open_after_hangup": ups.open,
                    "router_outcomes": detail.get("outcomes"),
                    "router_workers": detail.get("workers")}
        finally:
            for a in reversed(agents):
                a.stop()
            ups.close()


def sample(pid: int, port: int) -> None:
    """Print each new maximum of the connections ``pid`` holds to ``port`` (sampled every
    0.2 s) until terminated (at most 10 minutes)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    most = 0
    print(0, flush=True)
    until = time.monotonic() + 600
    while time.monotonic() < until:
        n = connections_to(pid, port)
        if n > most:
            most = n
            print(most, flush=True)
        time.sleep(0.2)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--sample":
        sample(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hanging", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--settle", type=float, default=17.0,
                    help="seconds between the attack's start and the probes")
    ap.add_argument("--tree", default=str(REPO), help="source tree to run the agents from")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.hanging <= 5000 or not 10 <= args.probes <= 5000 \
            or not 5 <= args.seconds <= 300 or not 0 <= args.settle < args.seconds:
        ap.error("--hanging 1..5000, --probes 10..5000, --seconds 5..300, "
                 "--settle 0..--seconds")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    b, d = result["before"], result["during"]
    print(f"tree {result['tree']}: {args.hanging} requests hang on the hostile worker")
    print(f"  routes to the good worker  before: p50 {b['p50_ms']} ms  p99 {b['p99_ms']} ms"
          f"  ({b['failed']} failed)")
    print(f"                             during: p50 {d['p50_ms']} ms  p99 {d['p99_ms']} ms"
          f"  ({d['failed']} failed)   p99 ratio {result['p99_ratio']}")
    print(f"  hostile worker held at most {result['hostile_connections']} of the router's "
          f"{POOL} connections ({result['hostile_share_of_pool']:.1%}); its upstream held "
          f"{result['upstream_open']} at most")
    print(f"  hanging requests ended: {result['ends']}")
    print(f"  held upstream after the callers hung up: {result['upstream_open_after_hangup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
