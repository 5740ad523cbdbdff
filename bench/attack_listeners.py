"""Listener attack benchmark (issue 20 item 1): one client holds 20,000 idle or slow
connections to a worker's gateway; do fresh requests from other addresses still succeed,
does the admin API answer, and what does it cost the agent's memory?

    python3 bench/attack_listeners.py [--connections 20000] [--seconds 30]
                                      [--sources 200] [--mode mixed|idle|slow]
                                      [--rounds 2] [--system-malloc]
                                      [--tree PATH] [--json]

Everything on loopback, started by this script, torn down at the end:

* a **worker** agent (``python -m agent run``) with the systemd unit's file limit
  (``LimitNOFILE=16384``, set with ``setrlimit`` before exec); ``--tree`` runs the agent
  from another source tree (e.g. a ``git worktree`` of the commit before the bounds,
  for the "before" figures);
* the **attacker**: 2 processes (this script with ``--attacker``), each holding half of
  ``--connections`` to the gateway from ``--sources`` addresses in 127.1.0.0/16: ``idle``
  connections send nothing, ``slow`` ones send a head one line every 10 s and never
  finish it, ``mixed`` is half and half; ``bigheads`` connections each send 1 MB of an
  unfinished head (128 lines of 8,000 bytes; use with ``--connections 1000``). A connection the agent closes is opened again at
  once, so the attacker keeps trying to hold all of them for ``--seconds``;
* the **caller**: every 50 ms a fresh connection from 127.2.0.x (other addresses) asks
  the gateway for an ownership proof (``GET /.well-known/rma-agent/proof``); every second
  the admin API's ``/healthz`` is asked too. A request succeeds when its 200 arrives
  within 10 s.

Reported per round (``--rounds`` attacks one after the other on the same agent): the
share of fresh requests and admin checks that succeeded, the agent's RSS (baseline, peak
during the attack, and up to 20 s after it ended), and the connections the agent shed
(``rma_agent_http_shed_total``, cumulative). ``--system-malloc`` runs the agent with
``PYTHONMALLOC=malloc`` (glibc's allocator for every object instead of CPython's arenas). Targets: >= 99 % succeed, the admin API
answers, peak RSS < 300 MB, RSS back near its baseline afterwards.

This script raises its own file limit (it needs root for more than the hard limit) and
sends traffic only to loopback. Bounded: ``--seconds`` of attack plus a fixed settle time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UNIT_NOFILE = 16384                     # systemd/rma-agent.service LimitNOFILE
PROOF = "/.well-known/rma-agent/proof?nonce=" + "ab" * 16
SETTLE_S = 20.0
BIG_HEAD = b"GET /bench/x HTTP/1.1\r\nHost: victim\r\n" + b"".join(
    b"X-Big-%03d: %s\r\n" % (i, b"a" * 7985) for i in range(128))     # 1 MB, unfinished


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- the agent
def start_agent(tmp: Path, tree: Path, system_malloc: bool = False,
                ) -> tuple[subprocess.Popen[bytes], str, str]:
    http, gw = _free_port(), _free_port()
    cfg = tmp / "w.toml"
    cfg.write_text(f"""
[agent]
role = "worker"
name = "attacked"
state_dir = "{tmp / 'state'}"
[dht]
listen = "127.0.0.1:{_free_port(socket.SOCK_DGRAM)}"
[http]
listen = "127.0.0.1:{http}"
[gateway]
listen = "127.0.0.1:{gw}"
[worker]
services = ["bench"]
endpoint = "http://127.0.0.1:{gw}"
gpu = "T4"
gpu_memory_gb = 16
[log]
level = "info"
""")

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (UNIT_NOFILE, UNIT_NOFILE))

    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(tree)
    if system_malloc:
        env["PYTHONMALLOC"] = "malloc"
    log = open(tmp / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                            cwd=tree, env=env, stdout=log, stderr=log, preexec_fn=limits)
    admin, gateway = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{gw}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(admin + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, admin, gateway
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"agent did not start:\n{(tmp / 'agent.log').read_text()[-2000:]}")


# ----------------------------------------------------------------------------- attacker
async def attacker(port: int, count: int, sources: list[str], mode: str,
                   seconds: float) -> dict[str, int]:
    """Hold ``count`` connections to 127.0.0.1:``port``; reopen what the server closes."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket | None] = [None] * count
    stats = {"opened": 0, "closed_by_server": 0, "connect_failed": 0}

    async def open_one(i: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((sources[i % len(sources)], 0))
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 10)
            if mode == "bigheads":
                socks[i] = s
                stats["opened"] += 1
                await asyncio.wait_for(loop.sock_sendall(s, BIG_HEAD), 30)
                return
            if mode == "slow" or (mode == "mixed" and i % 2):
                s.send(b"GET /bench/x HTTP/1.1\r\nHost: victim\r\n")
        except (OSError, TimeoutError):
            if socks[i] is s:        # a big head cut short by the server: seen as closed
                return
            s.close()
            stats["connect_failed"] += 1
            return
        socks[i] = s
        stats["opened"] += 1

    end = loop.time() + seconds
    tick = 0
    while loop.time() < end:
        missing = [i for i, s in enumerate(socks) if s is None]
        for start in range(0, len(missing), 500):          # open in bounded batches
            await asyncio.gather(*(open_one(i) for i in missing[start:start + 500]))
            if loop.time() >= end:
                break
        await asyncio.sleep(1.0)
        tick += 1
        for i, s in enumerate(socks):
            if s is None:
                continue
            try:
                data = s.recv(4096)
                if data == b"" or data:
                    stats["closed_by_server"] += 1
                    s.close()
                    socks[i] = None
                    continue
            except BlockingIOError:
                pass
            except OSError:
                stats["closed_by_server"] += 1
                s.close()
                socks[i] = None
                continue
            if tick % 10 == 0 and (mode == "slow" or (mode == "mixed" and i % 2)):
                with contextlib.suppress(OSError):
                    s.send(b"X-Slow-%d: 1\r\n" % tick)       # one line every 10 s
    stats["held_at_end"] = sum(1 for s in socks if s is not None)
    for s in socks:
        if s is not None:
            s.close()
    return stats


# ----------------------------------------------------------------------------- caller
async def fresh_get(url: str, path: str, source: str) -> bool:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, int(port),
                                                           local_addr=(source, 0))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return False
    return answer.startswith(b"HTTP/1.1 200")


async def caller(gateway: str, admin: str, pid: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    fresh: list[asyncio.Task[bool]] = []
    checks: list[asyncio.Task[bool]] = []
    rss_peak = 0.0
    end = loop.time() + seconds
    n = 0
    while loop.time() < end:
        src = f"127.2.{n // 250 % 250}.{1 + n % 250}"
        fresh.append(asyncio.ensure_future(fresh_get(gateway, PROOF, src)))
        if n % 20 == 0:
            checks.append(asyncio.ensure_future(fresh_get(admin, "/healthz", "127.0.0.1")))
            rss_peak = max(rss_peak, _rss_mb(pid))
        n += 1
        await asyncio.sleep(0.05)
    ok = sum(await asyncio.gather(*fresh))
    admin_ok = sum(await asyncio.gather(*checks))
    return {"fresh_requests": len(fresh), "fresh_ok": ok,
            "fresh_ok_pct": round(100 * ok / max(1, len(fresh)), 2),
            "admin_checks": len(checks), "admin_ok": admin_ok, "rss_peak_mb": rss_peak}


def _shed(admin: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {"metrics": -1}
    for line in text.splitlines():
        if line.startswith("rma_agent_http_shed_total{") and 'listener="gateway"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return {k: v for k, v in out.items() if v}


def attack_round(args: argparse.Namespace, proc: subprocess.Popen[bytes], admin: str,
                 gateway: str, baseline: float) -> dict[str, Any]:
    """One attack: ``--connections`` held for ``--seconds`` while fresh callers ask."""
    port = int(gateway.rsplit(":", 1)[1])
    sources = [f"127.1.{i // 250}.{1 + i % 250}" for i in range(args.sources)]
    half = args.connections // 2
    attackers = [subprocess.Popen(
        [sys.executable, __file__, "--attacker", str(port), str(half), args.mode,
         str(args.seconds), ",".join(sources[k::2] or sources)], stdout=subprocess.PIPE)
        for k in range(2)]
    ramp = min(10.0, args.seconds / 3)
    time.sleep(ramp)                                    # let the connections pile up
    during = asyncio.run(caller(gateway, admin, proc.pid, max(5.0, args.seconds - ramp)))
    held = [json.loads(a.communicate(timeout=args.seconds + 60)[0] or b"{}")
            for a in attackers]
    deadline = time.monotonic() + SETTLE_S
    after = _rss_mb(proc.pid)
    while time.monotonic() < deadline and after > baseline * 1.15:
        time.sleep(1)
        after = _rss_mb(proc.pid)
    return {**during, "rss_peak_mb": round(during["rss_peak_mb"], 1),
            "rss_after_mb": round(after, 1), "agent_alive": proc.poll() is None,
            "attacker_held_at_end": sum(h.get("held_at_end", 0) for h in held),
            "attacker_reopened": sum(h.get("closed_by_server", 0) for h in held),
            "shed": _shed(admin)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    _raise_nofile(args.connections // 2 + 4096)
    with tempfile.TemporaryDirectory(prefix="attack-") as tmpdir:
        proc, admin, gateway = start_agent(Path(tmpdir), Path(args.tree).resolve(),
                                           args.system_malloc)
        try:
            time.sleep(2)
            for _ in range(20):                       # warm: the proof path once each
                asyncio.run(fresh_get(gateway, PROOF, "127.0.0.1"))
            baseline = _rss_mb(proc.pid)
            rounds = [attack_round(args, proc, admin, gateway, baseline)
                      for _ in range(args.rounds)]
            return {"tree": str(args.tree), "mode": args.mode,
                    "connections": args.connections, "sources": args.sources,
                    "seconds": args.seconds, "system_malloc": args.system_malloc,
                    "rss_baseline_mb": round(baseline, 1), "rounds": rounds}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--attacker":
        port, count, mode, seconds, sources = sys.argv[2:7]
        _raise_nofile(int(count) + 1024)
        stats = asyncio.run(attacker(int(port), int(count), sources.split(","), mode,
                                     float(seconds)))
        print(json.dumps(stats))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--sources", type=int, default=200)
    ap.add_argument("--mode", choices=("mixed", "idle", "slow", "bigheads"), default="mixed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--system-malloc", action="store_true",
                    help="run the agent with PYTHONMALLOC=malloc")
    ap.add_argument("--tree", default=str(REPO), help="source tree to run the agent from")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.connections <= 60_000 or not 5 <= args.seconds <= 300 \
            or not 1 <= args.rounds <= 5:
        ap.error("--connections 1..60000, --seconds 5..300, --rounds 1..5")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k != "rounds":
                print(f"{k:18} {v}")
        for i, r in enumerate(result["rounds"], 1):
            print(f"round {i}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
