"""Helpers shared by the tests (import as ``tests.util``).

- ``wait_for`` / ``wait_for_async``: THE polling helper (wait until a condition holds;
  on timeout say what was awaited and the last value seen). Tests wait on events and
  state with it, never on fixed sleeps; its timeout is a generous limit, not a speed
  claim (speed is measured in bench/).
- ``require`` / ``requires``: a test the machine cannot run skips, except in CI (``CI``
  set), where it fails: a skip there would hide a broken set-up behind a green run.
- ports, configs, ``http``, processes: the pieces tests/cluster.py (the one way to run
  agent processes in a test) is built from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import toml_dumps
from agent.ratelimit import TokenBucket

REPO = Path(__file__).resolve().parent.parent


# Ports handed out by free_port: chosen by us, not by bind(0). A port bind(0) returns is in
# the kernel's ephemeral range, where any process's connect() or bind(0) may take it in the
# moment between our probe closing it and the agent binding it; with the suite split over
# pytest-xdist workers (scripts/test.sh) the other worker makes thousands of such sockets.
# So each test process draws from its own slice of the ports below the ephemeral range,
# which the kernel never hands out by itself.
_PORTS_FROM = 10_000
_handed_out: set[int] = set()
_draw = random.SystemRandom()


def _port_slice() -> Sequence[int]:
    """This process's ports: below the ephemeral range, split among xdist workers."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    top = max(low, _PORTS_FROM + 2_000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    width = (top - _PORTS_FROM) // max(count, 1)
    start = _PORTS_FROM + index * width
    return range(start, start + width)


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port of this process's slice that binds now and was not handed out before."""
    ports = _port_slice()
    for _ in range(200):
        port = _draw.choice(ports)
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {min(ports)}-{max(ports)}")


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM, host)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def write_config(path: Path, data: dict[str, dict[str, Any]]) -> Path:
    path.write_text(toml_dumps(data))
    return path


def coordinator_config(tmp: Path, name: str = "coord", **extra: dict[str, Any]) -> tuple[Path, int]:
    """A seedless coordinator on loopback; returns (config path, http port)."""
    http = free_port()
    data: dict[str, dict[str, Any]] = {
        "agent": {"role": "coordinator", "name": name, "state_dir": str(tmp / f"state-{name}")},
        "dht": {"listen": f"127.0.0.1:{free_udp_tcp_port()}", "mode": "server"},
        "http": {"listen": f"127.0.0.1:{http}"},
        "gateway": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info"},
    }
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return write_config(tmp / f"{name}.toml", data), http


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def http(method: str, url: str, body: Any = None, timeout: float = 3.0,
         raw: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON or text); status 0 when the connection fails."""
    data = raw
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        payload, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError):
        return 0, None
    if "json" in ctype:
        try:
            return status, json.loads(payload)
        except ValueError:
            pass
    return status, payload.decode("utf-8", "replace")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """``http("GET", url)``: (status, parsed JSON or text); connection errors give 0."""
    return http("GET", url, timeout=timeout)


class _Poll:
    """The bookkeeping shared by ``wait_for`` and ``wait_for_async``: the deadline, how
    many times the condition was asked, the last value it gave, and the failure message
    (what was awaited, for how long, and what was seen last — a bare "timed out" tells
    the next engineer nothing)."""

    def __init__(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.what = what or getattr(predicate, "__qualname__", repr(predicate))
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.polls = 0
        self.last: Any = None

    def check(self) -> bool:
        return self.seen(self.predicate())

    def seen(self, value: Any) -> bool:
        """Count one check that gave ``value``; is it the awaited one?"""
        self.polls += 1
        self.last = value
        return bool(value)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self) -> AssertionError:
        took = time.monotonic() - self.start
        last = repr(self.last)
        if len(last) > 2000:
            last = last[:2000] + "..."
        return AssertionError(f"timed out after {took:.1f}s (limit {self.timeout:g}s, "
                              f"{self.polls} checks) waiting for: {self.what}; "
                              f"last value: {last}")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1,
             what: str = "") -> Any:
    """Poll ``predicate()`` until it is truthy and return that value; on timeout fail with
    what was awaited and the last value seen. The timeout is a generous limit for a
    condition that must come (an event, a state), never a claim about speed: timings are
    measured in bench/. The condition is checked once more at the deadline, so a slow
    machine that got there just in time does not fail."""
    poll = _Poll(predicate, timeout, what)
    while True:
        expired = poll.expired()
        if poll.check():
            return poll.last
        if expired:
            raise poll.failure()
        time.sleep(interval)


async def tasks_ended(timeout: float = 1.0) -> None:  # noqa: ASYNC109
    """After stopping nodes in a test's teardown: wait until the loop's other tasks (the
    nodes' cancelled background work) have ended, so the loop closes with none pending;
    returns as soon as they have, and never fails (a task still running at ``timeout`` is
    the test's own business, not the teardown's)."""
    import asyncio

    me = asyncio.current_task()
    others = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
    if others:
        await asyncio.wait(others, timeout=timeout)


async def wait_for_async(predicate: Callable[[], Any], timeout: float = 10.0,  # noqa: ASYNC109
                         interval: float = 0.02, what: str = "") -> Any:
    """``wait_for`` for a condition changed by tasks on the running event loop (sleeping
    in between lets them run). The predicate may be a coroutine function (e.g. a lookup
    over the network): what it returns is awaited before it is judged."""
    import asyncio
    import inspect

    poll = _Poll(predicate, timeout, what)
    while True:
        expired = poll.expired()
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if poll.seen(value):
            return poll.last
        if expired:
            raise poll.failure()
        await asyncio.sleep(interval)


class PageServer:
    """A stand-in HTTP server on a free loopback port (a thread): GET answers fixed by
    path (query ignored), 404 with ``missing`` otherwise. ``url``; ``close()``."""

    def __init__(self, pages: dict[str, bytes], content_type: str = "text/plain",
                 missing: bytes = b"not found\n") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = pages.get(self.path.split("?")[0])
                data = page if page is not None else missing
                self.send_response(200 if page is not None else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.srv.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


class ManualClock:
    """A clock that moves only when the test says so (``advance``)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class ClockedBucket(TokenBucket):
    """A rate limiter's token bucket on a ``ManualClock``. On the wall clock, tokens come
    back while a test makes its requests: on a loaded machine a "flood" spreads over
    seconds and gets more through than the burst, and the 429 counts the test expects do
    not come (seen under stress-ng). Here tokens come back only when the test advances
    the clock, so the counts are the limiter's contract, exactly, at any machine speed."""

    def __init__(self, rate: float, burst: float, clock: ManualClock) -> None:
        super().__init__(rate, burst)
        self.clock = clock
        self.stamp = clock()

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        return super().take(n, self.clock() if now is None else now)


def in_ci() -> bool:
    """True on the CI machine (``CI`` set, as CI services do), where .ci/run installs
    everything the suite needs and runs as root."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(why_not: str | None, *, allow_module_level: bool = False) -> None:
    """Skip when the machine cannot run a test (``why_not`` says why) — except in CI,
    where a skip would hide a broken set-up behind a green run: there it fails."""
    if why_not is None:
        return
    if in_ci():
        pytest.fail(f"cannot run in CI, where it must: {why_not}", pytrace=False)
    pytest.skip(why_not, allow_module_level=allow_module_level)


def requires(why_not: str | None) -> pytest.MarkDecorator:
    """A mark for ``require``: ``@requires(None if can_spoof() else "needs root")``.
    tests/conftest.py applies it before the test runs (a plain ``skipif`` would skip
    silently in CI too)."""
    return pytest.mark.requires(why_not)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


def run_uvloop(coro: Any) -> Any:
    """Run ``coro`` on uvloop; fail if any exception escaped into the loop's handler
    (an exception in a stray task is a defect even when the test's own checks pass)."""
    import asyncio

    import uvloop

    escaped: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: escaped.append(ctx))
        return await coro

    out = uvloop.run(main())
    assert not escaped, escaped[:3]
    return out
