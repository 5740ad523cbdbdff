"""Streaming benchmark: what router + gateway add to the first token, and how fast a
caller's hang-up reaches the upstream (issue 17 item 4).

    python3 bench/stream.py [--requests 400] [--hangups 20] [--token-delay-ms 10] [--json]

Everything on 127.0.0.1, started by this script and torn down at the end — the same set-up
as ``bench/route.py`` (its helpers are reused): a **token server** (aiohttp on uvloop, its
own process) streaming ``text/event-stream``, a **worker** agent whose gateway fronts it as
service ``bench``, and a **caller** agent whose router reaches the worker through the DHT.
Three paths, measured in the same run and interleaved request by request (so a machine
that slows down mid-run slows every path alike): (a) the token server directly, (b) the
worker's gateway, (c) the caller's router and then the gateway.

* **First token** — one keep-alive connection per path, one request at a time: the time
  from sending ``GET /tok`` to the first byte of the first event. Twice: the event written
  with the answer's head (what a relay adds to a new answer), and written
  ``--token-delay-ms`` after the head (what it adds to a chunk of an answer under way:
  the prefill of an LLM). The figure is (c) - (a) at p50; the target is <= 2 ms.
* **Chunks of a stream under way** — ``GET /ticks``: an event every ``--token-delay-ms``,
  each stamped with the server's ``CLOCK_MONOTONIC`` when written; the client notes how
  long each took to arrive (every hop forwards a chunk as soon as it has it).
* **Hang-up** — the caller reads the head and first event of ``GET /hang`` (mid-stream)
  or sends ``GET /hold`` and waits until the server has it (before the first byte), then
  closes its socket (FIN, as a client that goes away does). The token server notes when
  its handler is cancelled (``handler_cancellation``); propagation is that instant minus
  the close, both on ``CLOCK_MONOTONIC`` (one clock for every process of the machine).
  (a) is the server noticing its own client; (c) is the whole chain, target <= 1 s.
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

from bench.pair import Procs, parse_or_serve, percentile, start_pair  # noqa: E402

PATHS = {"a": "direct", "b": "gateway", "c": "router + gateway"}


# ---------------------------------------------------------------------- the token server
def serve_upstream(port: int) -> None:
    """The token server process (``--serve-upstream PORT``)."""
    from aiohttp import web

    seen: dict[str, asyncio.Event] = {}
    gone: dict[str, float] = {}
    gone_ev: dict[str, asyncio.Event] = {}

    def ev(table: dict[str, asyncio.Event], key: str) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())

    async def tok(r: web.Request) -> web.StreamResponse:
        delay = float(r.query.get("delay", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(r)
        if delay:
            await asyncio.sleep(delay)
        for i in range(3):
            await resp.write(f"data: token {i}\n\n".encode())
        await resp.write_eof()
        return resp

    async def held(r: web.Request, answer: bool) -> web.StreamResponse:
        key = r.query["id"]
        try:
            if answer:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(r)
                await resp.write(b"data: token 0\n\n")
            ev(seen, key).set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            gone[key] = time.monotonic()
            ev(gone_ev, key).set()
            raise
        raise AssertionError("unreachable")

    async def hang(r: web.Request) -> web.StreamResponse:
        return await held(r, True)

    async def hold(r: web.Request) -> web.StreamResponse:
        return await held(r, False)

    async def wait(r: web.Request) -> web.Response:
        key, what = r.query["id"], r.query["what"]
        event = ev(seen if what == "seen" else gone_ev, key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 10)
        return web.json_response({"ok": event.is_set(), "gone_at": gone.get(key)})

    async def ticks(r: web.Request) -> web.StreamResponse:
        n, gap = int(r.query.get("n", "50")), float(r.query.get("gap", "0.01"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(r)
        for _ in range(n):
            await asyncio.sleep(gap)
            await resp.write(f"data: {time.monotonic():.9f}\n\n".encode())
        await resp.write_eof()
        return resp

    async def ok(_r: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/tok", tok)
    app.router.add_get("/ticks", ticks)
    app.router.add_get("/hang", hang)
    app.router.add_get("/hold", hold)
    app.router.add_get("/wait", wait)
    app.router.add_get("/small", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                handler_cancellation=True, loop=uvloop.new_event_loop())


# ---------------------------------------------------------------------- the client
class Stream:
    """One keep-alive HTTP/1.1 connection that can time the first byte of an answer's
    body (chunked) and hang up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> Stream:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def send(self, path: str) -> None:
        assert self.w is not None
        self.w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

    async def head(self) -> int:
        assert self.r is not None
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"chunked" not in head.lower():
            raise RuntimeError(f"not a chunked answer: {head[:200]!r}")
        return status

    async def chunk(self) -> bytes:
        """The next chunk's data (b"" at the end of the answer)."""
        assert self.r is not None
        size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await self.r.readexactly(size + 2)
        return data[:-2]

    async def first_token(self, path: str) -> float:
        """Seconds from sending ``path`` to the first event's first byte; the rest of
        the answer is read so the connection can be used again."""
        t0 = time.perf_counter()
        self.send(path)
        status = await self.head()
        first = await self.chunk()
        dt = time.perf_counter() - t0
        if status != 200 or not first.startswith(b"data:"):
            raise RuntimeError(f"{path}: {status} {first[:100]!r}")
        while await self.chunk():
            pass
        return dt

    def hang_up(self) -> float:
        """Close the socket (FIN); the ``time.monotonic()`` of the close."""
        assert self.w is not None
        t = time.monotonic()
        self.w.close()
        return t


async def ask(port: int, path: str) -> dict[str, Any]:
    """A JSON GET on the token server's control path (one connection each)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    return dict(json.loads(data.partition(b"\r\n\r\n")[2]))


async def first_tokens(ports: dict[str, tuple[int, str]], n: int,
                       delay_s: float) -> dict[str, list[float]]:
    """``n`` first-token times per path (ms), the paths interleaved request by request."""
    conns = {k: await Stream(port).open() for k, (port, _) in ports.items()}
    out: dict[str, list[float]] = {k: [] for k in ports}
    query = f"/tok?delay={delay_s}"
    for _ in range(30):                              # warm up: proofs, pools, caches
        for k, (_, prefix) in ports.items():
            await conns[k].first_token(prefix + query)
    for _ in range(n):
        for k, (_, prefix) in ports.items():
            out[k].append(1000 * await conns[k].first_token(prefix + query))
    for c in conns.values():
        c.hang_up()
    return out


async def chunk_delays(ports: dict[str, tuple[int, str]], n: int,
                       gap_s: float) -> dict[str, list[float]]:
    """Per path, how long each chunk of a stream under way took from the token server's
    write (its ``CLOCK_MONOTONIC`` stamp in the event) to this client (ms); the paths'
    streams run one after the other, the first 5 chunks of each left out (warm-up)."""
    out: dict[str, list[float]] = {}
    for k, (port, prefix) in ports.items():
        s = await Stream(port).open()
        s.send(f"{prefix}/ticks?n={n + 5}&gap={gap_s}")
        if await s.head() != 200:
            raise RuntimeError(f"{prefix}/ticks failed")
        delays = []
        while chunk := await s.chunk():
            # a slow reader (a loaded machine) may get several events in one chunk
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: "):
                    delays.append(1000 * (time.monotonic() - float(line[6:].strip())))
        s.hang_up()
        out[k] = delays[5:]
    return out


async def hang_up(up: int, port: int, prefix: str, key: str, mid_stream: bool) -> float:
    """Seconds from the caller's close to the token server's cancelled handler."""
    s = await Stream(port).open()
    if mid_stream:
        s.send(f"{prefix}/hang?id={key}")
        if await s.head() != 200 or not (await s.chunk()).startswith(b"data:"):
            raise RuntimeError(f"{prefix}/hang: no first event")
    else:
        s.send(f"{prefix}/hold?id={key}")
        seen = await ask(up, f"/wait?id={key}&what=seen")
        if not seen["ok"]:
            raise RuntimeError(f"{prefix}/hold never reached the token server")
    t_close = s.hang_up()
    gone = await ask(up, f"/wait?id={key}&what=gone")
    if not gone["ok"]:
        return float("inf")                           # never reached it (within 10 s)
    return float(gone["gone_at"]) - t_close


async def hang_ups(up: int, ports: dict[str, tuple[int, str]], n: int,
                   mid_stream: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ports}
    for i in range(n):
        for k, (port, prefix) in ports.items():
            key = f"{'m' if mid_stream else 'h'}{k}{i}"
            out[k].append(1000 * await hang_up(up, port, prefix, key, mid_stream))
    return out


# ---------------------------------------------------------------------- run and report
def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"p50_ms": percentile(v, 0.5), "p90_ms": percentile(v, 0.9), "max_ms": max(v),
                "samples": len(v)} for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="first-token samples per path")
    ap.add_argument("--hangups", type=int, default=20, help="hang-ups per path and kind")
    ap.add_argument("--token-delay-ms", type=float, default=10.0)
    args = parse_or_serve(ap, serve_upstream)
    if args is None:
        return 0
    results: dict[str, Any] = {}
    with Procs("rma-bench-stream-") as procs:
        up, c_http, _w_http, w_gw = start_pair(procs, __file__, 1)
        ports = {"a": (up, ""), "b": (w_gw, "/bench"), "c": (c_http, "/route/bench")}

        async def run_all() -> None:
            results["first_token_with_head"] = summary(
                await first_tokens(ports, args.requests, 0.0))
            results["first_token_after_head"] = summary(
                await first_tokens(ports, args.requests, args.token_delay_ms / 1000))
            results["chunk_mid_stream"] = summary(
                await chunk_delays(ports, args.requests // 4, args.token_delay_ms / 1000))
            results["hang_up_mid_stream"] = summary(
                await hang_ups(up, ports, args.hangups, True))
            results["hang_up_before_first_byte"] = summary(
                await hang_ups(up, ports, args.hangups, False))

        uvloop.run(run_all())
    out = {"paths": PATHS, **results, "load_average": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(out, indent=2))
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report(results, args)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The table for people (on stderr with --json, whose stdout is the JSON)."""
    print(f"stream benchmark: {args.requests} first tokens and {args.hangups} hang-ups of "
          f"each kind per path, interleaved; load average {os.getloadavg()[0]:.2f}")
    print(f"{'':28}{'(a) direct':>14}{'(b) gateway':>14}{'(c) router+gw':>15}"
          f"{'(c)-(a)':>10}{'(c)/(a)':>9}")
    for name, label in (("first_token_with_head", "first token, with head p50"),
                        ("first_token_after_head",
                         f"first token, +{args.token_delay_ms:g} ms p50"),
                        ("chunk_mid_stream", "chunk of a stream p50"),
                        ("hang_up_mid_stream", "hang-up mid-stream p50"),
                        ("hang_up_before_first_byte", "hang-up before head p50")):
        row = results[name]
        a, b, c = (row[k]["p50_ms"] for k in "abc")
        print(f"{label:28}{a:11.3f} ms{b:11.3f} ms{c:12.3f} ms{c - a:7.3f} ms"
              f"{c / a if a else float('nan'):8.2f}x")
    for name in ("hang_up_mid_stream", "hang_up_before_first_byte"):
        worst = results[name]["c"]["max_ms"]
        print(f"{name}: (c) worst {worst:.1f} ms of {results[name]['c']['samples']}")
    added = (results["first_token_with_head"]["c"]["p50_ms"]
             - results["first_token_with_head"]["a"]["p50_ms"])
    print(f"targets: first token added by router + gateway {added:.3f} ms at p50 (<= 2 ms); "
          f"hang-up reaches the upstream in "
          f"{results['hang_up_mid_stream']['c']['max_ms']:.1f} ms at worst (<= 1000 ms)")


if __name__ == "__main__":
    sys.exit(main())
