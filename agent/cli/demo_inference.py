"""An emulated GPU inference server: a few slots, a FIFO queue, heavy-tailed service times.

Why: a stand-in that answers every request after a fixed sleep with unlimited parallelism
makes any routing look good (issue 17). A real GPU box runs ``slots`` requests at once
(vLLM's batch, llama.cpp's ``--parallel``), queues the rest (bounded: Ollama answers 503
when its queue is full), takes a time per request that varies by orders of magnitude, and
may lose slots to its owner's own work. Routing is only measured honestly against that.

The model (one :class:`InferenceServer` per emulated box, configured by a
:class:`Profile`):

* **Slots and queue.** At most ``slots`` requests are served at once; later ones wait in
  a FIFO queue of at most ``queue_limit``; past that the answer is ``503`` with
  ``Retry-After: 1`` and Ollama's error text, at once. A freed slot passes straight to
  the first waiter (owner before requests).
* **Service time.** Lognormal with mean ``mean_ms`` and shape ``sigma`` (heavy right
  tail: with sigma = 1 the p99 is ~10x the median), capped at ``cap_factor`` x the
  mean (every run bounded), divided by ``speed`` (a GPU twice as fast takes half the
  time). Drawn from a ``random.Random(seed)`` per server, in arrival order, so a run is
  repeatable. ``X-Emu-Service-Ms: N`` on a request fixes its time (tests).
* **Owner load.** With ``owner_every_s > 0`` the box's owner takes one slot at
  exponentially distributed intervals (mean ``owner_every_s``) for an exponentially
  distributed time (mean ``owner_hold_s``), ahead of queued requests.
* **Answers.** JSON ``{"server", "id", "queued_ms", "service_ms", "path", "bytes"}``; with
  ``"stream": true`` in a JSON body (OpenAI's field) or ``?stream=1``, a
  ``text/event-stream`` of ``tokens`` chunks ``data: {...}`` spread over the service time,
  then ``data: [DONE]``. A caller that hangs up cancels its request (aiohttp handler
  cancellation): it leaves the queue or frees its slot, logged ``cancelled``.
* **Loading.** While ``loading`` (see :meth:`InferenceServer.set_loading`) ``/health``
  and every request answer 503, as llama.cpp does while it loads a model.
* **Not requests.** ``GET /`` answers 404 at once (vLLM does), so a health check on the
  base URL takes no slot; ``/metrics``, ``/health`` and ``/emu/log`` take none either.
* **Load signals.** ``GET /metrics``: vLLM's Prometheus gauges
  ``vllm:num_requests_running`` (requests in service), ``vllm:num_requests_waiting``
  (queued requests) and ``vllm:kv_cache_usage_perc`` (share of slots in use, the owner's
  included, 0..1), and llama.cpp's ``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred`` and ``llamacpp:kv_cache_usage_ratio`` (same values), so
  a gateway may read it as either kind. ``GET /slots``: llama.cpp's array, one object per
  slot, ``is_processing`` true for slots in use (an owner's hold shows as a busy slot:
  the slot count is the server's capacity). ``GET /health``: 200 ``{"status": "ok"}``,
  503 with llama.cpp's "Loading model" error while loading.
* **Log.** Every request (and owner hold) is logged with arrival, start and end times
  (``time.monotonic()``, one clock for every process on a Linux box) and its outcome;
  ``GET /emu/log`` serves it as JSON. :func:`sent_to_full` reads several servers' logs
  and tells which requests arrived at a full server while another had a free slot.

Run one by hand (e.g. as the ``vllm`` upstream of a worker's gateway)::

    python -m agent.cli.demo_inference --port 8000 --slots 2 --mean-ms 300

Others run in-process: :meth:`InferenceServer.start` on the caller's loop, or
:class:`InferenceFarm` (its own loop in a background thread) from synchronous code.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import itertools
import json
import math
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

LOG_MAX = 200_000                # log entries kept per server (oldest dropped)
WAIT_EPS_S = 0.002               # a request that started later than this waited
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
SERVICE_MS_HEADER = "X-Emu-Service-Ms"
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


@dataclass(frozen=True, slots=True)
class Profile:
    """One emulated box: its capacity, speed, service-time law and owner."""

    name: str = "gpu"
    slots: int = 2
    queue_limit: int = 16
    speed: float = 1.0
    mean_ms: float = 200.0
    sigma: float = 1.0
    cap_factor: float = 20.0
    tokens: int = 8
    owner_every_s: float = 0.0       # 0: no owner load
    owner_hold_s: float = 1.0
    seed: int = 0
    model: str = "emulated/llm"

    def __post_init__(self) -> None:
        if self.slots < 1 or self.queue_limit < 0 or self.tokens < 1:
            raise ValueError("slots and tokens must be >= 1, queue_limit >= 0")
        if not (self.speed > 0 and self.mean_ms >= 0 and self.sigma >= 0
                and self.cap_factor >= 1 and self.owner_hold_s > 0):
            raise ValueError("speed > 0, mean_ms >= 0, sigma >= 0, cap_factor >= 1, "
                             "owner_hold_s > 0")


@dataclass(slots=True)
class Entry:
    """One request (``kind="request"``) or owner hold (``kind="owner"``) at one server."""

    id: int
    kind: str
    arrival: float
    start: float = math.nan         # nan: never got a slot
    end: float = math.nan
    outcome: str = "pending"        # ok | rejected | loading | cancelled | pending


class SlotPool:
    """``slots`` slots; waiters in FIFO order, the owner's ahead of requests."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.used = 0
        self._owner: collections.deque[asyncio.Future[None]] = collections.deque()
        self._requests: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (the owner's waits not counted)."""
        return len(self._requests)

    @property
    def free(self) -> bool:
        return self.used < self.slots and not self._owner and not self._requests

    async def take(self, owner: bool = False) -> None:
        """Until a slot is ours; a cancelled waiter leaves the queue (or gives back the
        slot it was just handed)."""
        if self.free:
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._owner if owner else self._requests
        line.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                line.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter if any (``used`` unchanged)."""
        for line in (self._owner, self._requests):
            while line:
                fut = line.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.used -= 1


class InferenceServer:
    """One emulated box: ``app`` (aiohttp) plus its slots, log and owner task."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.pool = SlotPool(profile.slots)
        self.running = 0                       # requests in service (owner excluded)
        self.loading = False
        self.log: collections.deque[Entry] = collections.deque(maxlen=LOG_MAX)
        self.url = ""
        self._rng = random.Random(profile.seed)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._owner_task: asyncio.Task[None] | None = None
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/slots", self._slots)
        self.app.router.add_get("/emu/log", self._log)
        self.app.router.add_get("/", self._root)
        self.app.router.add_route("*", "/{path:.*}", self._handle)

    # ------------------------------------------------------------------ life
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server: Any = site._server
        self.url = f"http://{host}:{server.sockets[0].getsockname()[1]}"
        if self.profile.owner_every_s > 0:
            self._owner_task = asyncio.create_task(self._owner_loop())
        return self.url

    async def stop(self) -> None:
        if self._owner_task is not None:
            self._owner_task.cancel()
            await asyncio.gather(self._owner_task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def set_loading(self, loading: bool) -> None:
        """While True, ``/health`` and every request answer 503 (a model loading)."""
        self.loading = loading

    # ------------------------------------------------------------------ model
    def service_s(self, fixed_ms: str | None = None) -> float:
        """One service time in seconds (``fixed_ms``: the request's own, for tests)."""
        if fixed_ms is not None:
            try:
                return max(0.0, float(fixed_ms)) / 1000.0
            except ValueError:
                pass
        p = self.profile
        if p.mean_ms <= 0:
            return 0.0
        mu = math.log(p.mean_ms) - p.sigma * p.sigma / 2.0
        ms = min(self._rng.lognormvariate(mu, p.sigma), p.cap_factor * p.mean_ms)
        return ms / 1000.0 / p.speed

    async def _owner_loop(self) -> None:
        """The owner's own GPU work: one slot at a time, bounded by the server's life."""
        p = self.profile
        rng = random.Random(p.seed + 1_000_003)
        while True:
            await asyncio.sleep(rng.expovariate(1.0 / p.owner_every_s))
            entry = Entry(next(self._ids), "owner", time.monotonic())
            self.log.append(entry)
            await self.pool.take(owner=True)
            entry.start = time.monotonic()
            try:
                await asyncio.sleep(rng.expovariate(1.0 / p.owner_hold_s))
            finally:
                self.pool.release()
                entry.end, entry.outcome = time.monotonic(), "ok"

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        entry = Entry(next(self._ids), "request", time.monotonic())
        self.log.append(entry)
        if self.loading:
            entry.end, entry.outcome = entry.arrival, "loading"
            return web.json_response(LOADING, status=503)
        if not self.pool.free and self.pool.waiting >= self.profile.queue_limit:
            entry.end, entry.outcome = entry.arrival, "rejected"
            return web.json_response({"error": BUSY_ERROR}, status=503,
                                     headers={"Retry-After": "1"})
        try:
            return await self._serve(request, entry)
        except (asyncio.CancelledError, ConnectionResetError):
            entry.end, entry.outcome = time.monotonic(), "cancelled"
            raise

    async def _serve(self, request: web.Request, entry: Entry) -> web.StreamResponse:
        body = await request.read()
        stream = request.query.get("stream") in ("1", "true") or _wants_stream(body)
        await self.pool.take()
        entry.start = time.monotonic()
        self.running += 1
        try:
            seconds = self.service_s(request.headers.get(SERVICE_MS_HEADER))
            info = {"server": self.profile.name, "id": entry.id,
                    "queued_ms": round((entry.start - entry.arrival) * 1000, 3),
                    "service_ms": round(seconds * 1000, 3), "path": request.path,
                    "bytes": len(body)}
            if stream:
                resp = await self._stream(request, seconds, info)
            else:
                await asyncio.sleep(seconds)
                resp = web.json_response(info)
        finally:
            self.running -= 1
            self.pool.release()
        entry.end, entry.outcome = time.monotonic(), "ok"
        return resp

    async def _stream(self, request: web.Request, seconds: float,
                      info: dict[str, Any]) -> web.StreamResponse:
        """Server-Sent Events: ``tokens`` chunks spread evenly over ``seconds``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        n = self.profile.tokens
        for i in range(n):
            await asyncio.sleep(seconds / n)
            chunk = {**info, "token": i, "choices": [{"delta": {"content": f"tok{i} "}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _root(self, _request: web.Request) -> web.Response:
        """``GET /`` is no inference request: 404 at once, as vLLM (FastAPI) answers it.
        A gateway's default health check (any answer below 500) then costs no slot and
        never fails because the queue is full."""
        return web.json_response({"detail": "Not Found"}, status=404)

    async def _health(self, _request: web.Request) -> web.Response:
        if self.loading:
            return web.json_response(LOADING, status=503)
        return web.json_response({"status": "ok"})

    async def _slots(self, _request: web.Request) -> web.Response:
        return web.json_response(self.slots_json())

    def slots_json(self) -> list[dict[str, Any]]:
        """llama.cpp's ``GET /slots``: one object per slot, the busy ones first."""
        used = self.pool.used
        return [{"id": i, "id_task": -1, "n_ctx": 4096, "is_processing": i < used}
                for i in range(self.profile.slots)]

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(),
                            content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        """vLLM's and llama.cpp's load gauges in Prometheus text format (``/metrics``)."""
        label = f'{{engine="0",model_name="{self.profile.model}"}}'
        usage = min(1.0, self.pool.used / self.profile.slots)
        running, waiting = float(self.running), float(self.pool.waiting)
        rows = (("vllm:num_requests_running", label, "Number of requests in model "
                 "execution batches.", running),
                ("vllm:num_requests_waiting", label, "Number of requests waiting to be "
                 "processed.", waiting),
                ("vllm:kv_cache_usage_perc", label, "KV-cache usage. 1 means 100 percent "
                 "usage.", usage),
                ("llamacpp:requests_processing", "", "Number of requests processing.",
                 running),
                ("llamacpp:requests_deferred", "", "Number of requests deferred.", waiting),
                ("llamacpp:kv_cache_usage_ratio", "", "KV-cache usage. 1 means 100 percent "
                 "usage.", usage))
        out = []
        for name, labels, text, value in rows:
            out += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{labels} {value}"]
        return "\n".join(out) + "\n"

    async def _log(self, _request: web.Request) -> web.Response:
        def row(e: Entry) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in asdict(e).items()}
        return web.json_response({"server": self.profile.name, "slots": self.profile.slots,
                                  "entries": [row(e) for e in list(self.log)]})


def _wants_stream(body: bytes) -> bool:
    """OpenAI's ``"stream": true`` in a JSON object body."""
    if not body or body[:1] != b"{":
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


# ---------------------------------------------------------------------- analysis
def sent_to_full(logs: Mapping[str, tuple[int, Iterable[Entry]]],
                 since: float = -math.inf) -> tuple[int, int]:
    """(requests that arrived at a full server while another server had a free slot,
    requests counted) over several servers' logs: ``name -> (slots, entries)``.

    "Full" is read off the request itself: it was refused (queue full) or started more
    than ``WAIT_EPS_S`` after it arrived. "Free" at another server is its occupancy (its
    requests and owner holds with start <= t < end) below its slots at that arrival.
    Requests that arrived before ``since`` are not counted."""
    occ: dict[str, tuple[int, list[float], list[float]]] = {}
    for name, (slots, entries) in logs.items():
        held = [e for e in entries if not math.isnan(e.start)]
        ends = [e.end if not math.isnan(e.end) else math.inf for e in held]
        occ[name] = (slots, sorted(e.start for e in held), sorted(ends))
    bad = total = 0
    for name, (_slots, entries) in logs.items():
        for e in entries:
            if e.kind != "request" or e.arrival < since or e.outcome == "loading":
                continue
            total += 1
            waited = e.outcome == "rejected" or (
                not math.isnan(e.start) and e.start - e.arrival > WAIT_EPS_S)
            if waited and any(_occupancy(starts, ends, e.arrival) < slots
                              for other, (slots, starts, ends) in occ.items()
                              if other != name):
                bad += 1
    return bad, total


def _occupancy(starts: list[float], ends: list[float], t: float) -> int:
    return bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)


def entries_from_json(rows: Iterable[Mapping[str, Any]]) -> list[Entry]:
    """``/emu/log``'s entries back as :class:`Entry` (null times -> nan)."""
    def num(x: Any) -> float:
        return math.nan if x is None else float(x)
    return [Entry(int(r["id"]), str(r["kind"]), num(r["arrival"]), num(r["start"]),
                  num(r["end"]), str(r["outcome"])) for r in rows]


# ---------------------------------------------------------------------- hosting
class InferenceFarm:
    """Several servers on one event loop in a background thread, for synchronous code
    (the demo, benches): ``add`` starts one and returns its URL."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="inference-farm", daemon=True)
        self._thread.start()
        self.servers: list[InferenceServer] = []

    def add(self, profile: Profile, port: int = 0) -> str:
        server = InferenceServer(profile)
        url = asyncio.run_coroutine_threadsafe(server.start(port=port), self._loop).result(10)
        self.servers.append(server)
        return url

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the farm's loop (state reads, set_loading) and return it."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for s in self.servers:
                await s.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.cli.demo_inference``: one server in the foreground."""
    ap = argparse.ArgumentParser(description="an emulated GPU inference server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    for field in ("name", "slots", "queue_limit", "speed", "mean_ms", "sigma", "tokens",
                  "owner_every_s", "owner_hold_s", "seed"):
        default = getattr(Profile(), field)
        ap.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    args = ap.parse_args(argv)
    profile = Profile(**{k: v for k, v in vars(args).items() if k not in ("host", "port")})

    async def serve() -> None:
        server = InferenceServer(profile)
        print(await server.start(args.host, args.port), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
