"""Helpers shared by tests that run real agent processes (import as ``tests.util``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import toml_dumps

REPO = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (free for TCP and, usually, UDP too)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, parsed JSON or text); connection errors give status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            status = r.status
            ctype = r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        body, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError):
        return 0, None
    if "json" in ctype:
        return status, json.loads(body)
    return status, body.decode("utf-8", "replace")


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate()`` until truthy and return that value; fail with the last one."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate} "
                         f"(last: {last!r})")


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
