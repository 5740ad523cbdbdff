"""Routing benchmark: what the gateway and the router add to a request, against nginx.

    python3 bench/route.py [--seconds 3] [--requests 3000] [--concurrency 16]
                           [--stream-mb 1024] [--json]

Everything on 127.0.0.1, started by this script, torn down at the end:

* an **upstream**: a minimal HTTP server (aiohttp on uvloop, its own process) answering
  ``GET /small`` with 2 bytes, counting ``POST /sink`` bodies and streaming
  ``GET /source?mb=N``;
* a **worker** agent (``python -m agent run``) whose gateway fronts it as service
  ``bench`` (``[gateway.upstreams] bench = <upstream>``);
* a **caller** agent (coordinator role) that finds the worker through the DHT: its router
  is ``/route/bench/...``;
* **nginx** (Debian package ``nginx``; this script installs nothing — without it the
  nginx row is skipped and ``apt-get install nginx`` suggested) as a reverse proxy with
  upstream keep-alive in front of the same upstream.

Small requests (``GET .../small``) through (a) the upstream directly, (b) the worker's
gateway, (c) the caller's router and then the gateway, (d) nginx: added p50/p99 latency
(one request at a time, ``--requests`` per path or ``--seconds``, whichever first) and
requests/s (``--concurrency`` keep-alive connections, for ``--seconds``), all in one run.
Then a ``--stream-mb`` body uploaded through (c) and the same amount downloaded through
(c), and for comparison through (a), (b) and (d): MiB/s (2^20 bytes; the target is in MB). The load generator is a small raw-socket HTTP/1.1 client (keep-alive,
Content-Length or chunked answers) in this process, the same for every path.

nginx streams with ``proxy_request_buffering off`` and ``proxy_buffering off`` (as the
gateway does: no spooling to disk) and no body size limit.

Targets (issue 10): (c) adds <= 1 ms p50 over (a); (b) >= 0.7x nginx's requests/s;
(c) streams >= 300 MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
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
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from agent.config import toml_dumps  # noqa: E402

MB = 1 << 20
CHUNK = MB


# ---------------------------------------------------------------------- the upstream
def serve_upstream(port: int) -> None:
    """The upstream process (``--serve-upstream PORT``)."""
    from aiohttp import web

    async def small(_r: web.Request) -> web.Response:
        return web.Response(body=b"ok", content_type="text/plain")

    async def sink(r: web.Request) -> web.Response:
        n = 0
        async for chunk in r.content.iter_any():
            n += len(chunk)
        return web.json_response({"bytes": n})

    async def source(r: web.Request) -> web.StreamResponse:
        mb = int(r.query.get("mb", "1"))
        resp = web.StreamResponse()
        resp.content_length = mb * MB
        await resp.prepare(r)
        block = b"\x5a" * CHUNK
        for _ in range(mb):
            await resp.write(block)
        return resp

    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/small", small)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=uvloop.new_event_loop())


# ---------------------------------------------------------------------- a raw client
class Conn:
    """One keep-alive HTTP/1.1 connection (just enough for this benchmark)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.r, self.w = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def get(self, path: str) -> tuple[int, int]:
        """(status, body bytes)."""
        assert self.w is not None and self.r is not None
        self.w.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        return await self._answer()

    async def _answer(self) -> tuple[int, int]:
        assert self.r is not None
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked = None, False
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        n = 0
        if chunked:
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.r.readuntil(b"\r\n")
                    break
                while size:
                    got = await self.r.read(min(size, 1 << 20))
                    if not got:
                        raise ConnectionError("closed mid-body")
                    n += len(got)
                    size -= len(got)
                await self.r.readexactly(2)
        elif length:
            left = length
            while left:
                got = await self.r.read(min(left, 1 << 20))
                if not got:
                    raise ConnectionError("closed mid-body")
                n += len(got)
                left -= len(got)
        return status, n

    async def post_stream(self, path: str, total: int) -> tuple[int, int]:
        assert self.w is not None
        self.w.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                     f"Content-Length: {total}\r\n\r\n".encode())
        block = b"\xa5" * CHUNK
        left = total
        while left:
            n = min(left, CHUNK)
            self.w.write(block if n == CHUNK else block[:n])
            await self.w.drain()
            left -= n
        return await self._answer()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def latency(host: str, port: int, path: str, count: int, seconds: float) -> list[float]:
    c = Conn(host, port)
    await c.open()
    for _ in range(50):                      # warm up (the router's proof, pools)
        status, _ = await c.get(path)
        assert status == 200, (path, status)
    out = []
    deadline = time.perf_counter() + seconds
    try:
        while len(out) < count and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, _ = await c.get(path)
            out.append((time.perf_counter() - t0) * 1000)
            assert status == 200, (path, status)
    finally:
        c.close()
    return out


async def throughput(host: str, port: int, path: str, conc: int, seconds: float,
                     cap: int = 200_000) -> tuple[float, int]:
    """(requests/s, errors) with ``conc`` keep-alive connections for ``seconds``: only
    200 answers count as requests; the others (and a dropped connection) are errors."""
    conns = [Conn(host, port) for _ in range(conc)]
    await asyncio.gather(*(c.open() for c in conns))
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def loop(c: Conn) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop and done + errors < cap:
            try:
                status, _ = await c.get(path)
            except (ConnectionError, asyncio.IncompleteReadError):
                errors += 1
                return
            if status == 200:
                done += 1
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    dt = time.perf_counter() - t0
    for c in conns:
        c.close()
    return done / dt, errors


async def stream(host: str, port: int, prefix: str, mb: int) -> tuple[float, float]:
    """(upload MiB/s, download MiB/s) of ``mb`` MiB through ``prefix``."""
    c = Conn(host, port)
    await c.open()
    t0 = time.perf_counter()
    status, _ = await c.post_stream(f"{prefix}/sink", mb * MB)
    up = mb / (time.perf_counter() - t0)
    assert status == 200, status
    t0 = time.perf_counter()
    status, n = await c.get(f"{prefix}/source?mb={mb}")
    down = mb / (time.perf_counter() - t0)
    assert status == 200 and n == mb * MB, (status, n)
    c.close()
    return up, down


# ---------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 40.0, ok: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read()
                last = json.loads(body) if r.headers.get_content_type() == "application/json" \
                    else body
                if ok is None or ok(last):
                    return last
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s (last: {last!r})")


NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {tmp}/nginx-error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def write_configs(tmp: Path, up: int, stream_mb: int) -> tuple[int, int, int]:
    """caller.toml (coordinator: its router is the path under test) and worker.toml
    (its gateway fronts the upstream as service ``bench``); returns the caller's HTTP
    port and the worker's HTTP and gateway ports."""
    c_udp, c_http, c_gw = free_udp(), free_port(), free_port()
    w_udp, w_http, w_gw = free_udp(), free_port(), free_port()
    common = {"tunnel": {"mode": "off"}, "log": {"level": "warning"},
              "discovery": {"allow_private_hosts": ["127.0.0.1"]}}
    (tmp / "caller.toml").write_text(toml_dumps({
        "agent": {"role": "coordinator", "name": "caller", "state_dir": str(tmp / "sc")},
        "dht": {"listen": f"127.0.0.1:{c_udp}", "mode": "server"},
        "http": {"listen": f"127.0.0.1:{c_http}"},
        "gateway": {"listen": f"127.0.0.1:{c_gw}"}, **common}))
    (tmp / "worker.toml").write_text(toml_dumps({
        "agent": {"role": "worker", "name": "worker", "state_dir": str(tmp / "sw")},
        "dht": {"listen": f"127.0.0.1:{w_udp}", "mode": "server",
                "bootstrap": [f"127.0.0.1:{c_udp}"]},
        "http": {"listen": f"127.0.0.1:{w_http}"},
        "gateway": {"listen": f"127.0.0.1:{w_gw}", "max_body_mb": 4 * stream_mb,
                    "upstreams": {"bench": f"http://127.0.0.1:{up}"}},
        "worker": {"services": ["bench"], "endpoint": f"http://127.0.0.1:{w_gw}",
                   "max_concurrency": 256, "gpu": "A100", "gpu_memory_gb": 80},
        **common}))
    return c_http, w_http, w_gw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--stream-mb", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="rma-bench-route-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)

    def spawn(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                             stdout=open(tmp / log, "wb"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        up = free_port()
        spawn([sys.executable, __file__, "--serve-upstream", str(up)], "upstream.log")
        c_http, w_http, w_gw = write_configs(tmp, up, args.stream_mb)
        spawn([sys.executable, "-m", "agent", "run", "-c", str(tmp / "caller.toml")],
              "caller.log")
        spawn([sys.executable, "-m", "agent", "run", "-c", str(tmp / "worker.toml")],
              "worker.log")
        nginx_port: int | None = None
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                          else None)
        if nginx:
            nginx_port = free_port()
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, up=up, port=nginx_port))
            spawn([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], "nginx.log")
        else:
            print("nginx not found: its row is skipped (apt-get install nginx)", file=sys.stderr)
        wait_http(f"http://127.0.0.1:{up}/small")
        wait_http(f"http://127.0.0.1:{c_http}/readyz")
        wait_http(f"http://127.0.0.1:{w_http}/readyz")
        wait_http(f"http://127.0.0.1:{w_gw}/bench/small")
        wait_http(f"http://127.0.0.1:{c_http}/api/services/bench",
                  ok=lambda b: isinstance(b, dict) and b.get("workers"))
        if nginx_port:
            wait_http(f"http://127.0.0.1:{nginx_port}/small")
        paths = {"a": ("direct", up, "/small"), "b": ("gateway", w_gw, "/bench/small"),
                 "c": ("router + gateway", c_http, "/route/bench/small")}
        if nginx_port:
            paths["d"] = ("nginx", nginx_port, "/small")
        results: dict[str, dict[str, float]] = {}

        async def run_all() -> None:
            for key, (name, port, path) in paths.items():
                print(f"({key}) {name}: {path} ...", file=sys.stderr, flush=True)
                lat = await latency("127.0.0.1", port, path, args.requests, args.seconds)
                rps, errors = await throughput("127.0.0.1", port, path, args.concurrency,
                                               args.seconds)
                results[key] = {"p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                                "rps": rps, "errors": errors, "samples": len(lat)}
            for key, (_name, port, path) in paths.items():
                prefix = path.removesuffix("/small")
                up_mib, down_mib = await stream("127.0.0.1", port, prefix, args.stream_mb)
                results[key].update(upload_mib_s=up_mib, download_mib_s=down_mib)

        uvloop.run(run_all())
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"paths": {k: {"name": paths[k][0], **v} for k, v in results.items()},
           "stream_mib": args.stream_mb, "load_average": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(out, indent=2))
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report(results, paths, args)
    return 0


def report(results: dict[str, dict[str, Any]], paths: dict[str, Any],
           args: argparse.Namespace) -> None:
    """The table for people (on stderr with --json, whose stdout is the JSON)."""
    base = results["a"]
    up_mbs, down_mbs = results["c"]["upload_mib_s"], results["c"]["download_mib_s"]
    print(f"route benchmark: {args.requests} requests or {args.seconds:g} s per latency row, "
          f"{args.concurrency} connections for req/s, {args.stream_mb} MiB streamed each way "
          f"per path; load average {os.getloadavg()[0]:.2f}; req/s counts 200 answers only, "
          f"errors (non-200) are shown apart")
    print(f"{'path':<22} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
          f"{'req/s':>8} {'up MiB/s':>9} {'down MiB/s':>10}")
    for k, v in results.items():
        print(f"({k}) {paths[k][0]:<18} {v['p50_ms']:8.3f} {v['p99_ms']:8.3f} "
              f"{v['p50_ms'] - base['p50_ms']:8.3f} {v['p99_ms'] - base['p99_ms']:8.3f} "
              f"{v['rps']:8.0f} {v['upload_mib_s']:9.0f} {v['download_mib_s']:10.0f}"
              + (f"  ({v['errors']:.0f} errors)" if v["errors"] else ""))
    added = results["c"]["p50_ms"] - base["p50_ms"]
    print(f"target (c) adds <= 1 ms p50: {added:.3f} ms -> "
          f"{'met' if added <= 1.0 else 'NOT met'}")
    if "d" in results:
        ratio = results["b"]["rps"] / results["d"]["rps"]
        print(f"target (b) >= 0.7x nginx req/s: {ratio:.2f}x -> "
              f"{'met' if ratio >= 0.7 else 'NOT met'}")
    slow = min(up_mbs, down_mbs) * MB / 1e6
    print(f"target (c) streams >= 300 MB/s (286 MiB/s): {slow:.0f} MB/s -> "
          f"{'met' if slow >= 300 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
