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
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from bench.pair import (  # noqa: E402
    Procs,
    free_port,
    nginx_binary,
    parse_or_serve,
    percentile,
    start_pair,
    wait_http,
)

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--stream-mb", type=int, default=1024)
    args = parse_or_serve(ap, serve_upstream)
    if args is None:
        return 0
    with Procs("rma-bench-route-") as procs:
        up, c_http, _w_http, w_gw = start_pair(procs, __file__, args.stream_mb)
        nginx_port: int | None = None
        nginx = nginx_binary()
        if nginx:
            nginx_port = free_port()
            tmp = procs.tmp
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, up=up, port=nginx_port))
            procs.spawn([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], "nginx.log")
            wait_http(f"http://127.0.0.1:{nginx_port}/small")
        else:
            print("nginx not found: its row is skipped (apt-get install nginx)", file=sys.stderr)
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
                results[key] = {"p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
                                "rps": rps, "errors": errors, "samples": len(lat)}
            for key, (_name, port, path) in paths.items():
                prefix = path.removesuffix("/small")
                up_mib, down_mib = await stream("127.0.0.1", port, prefix, args.stream_mb)
                results[key].update(upload_mib_s=up_mib, download_mib_s=down_mib)

        uvloop.run(run_all())
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
