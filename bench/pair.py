"""The processes ``bench/route.py`` and ``bench/stream.py`` measure through, shared so
that both benchmarks start, wait for and stop them alike: an upstream (the script's own
``--serve-upstream PORT``), a **caller** agent (coordinator role: its router is the path
under test) and a **worker** agent whose gateway fronts the upstream as service
``bench``, each its own process on 127.0.0.1 logging into one temporary directory.

:class:`Procs` owns the processes and the directory (SIGTERM, SIGKILL after 8 s, the
directory removed, whatever happened; ``bench/balance.py`` uses it too);
:func:`start_pair` starts the three and returns once the caller's router finds the worker.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import toml_dumps  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (NaN for no samples): both benchmarks' rows are
    read alike."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


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


class Procs:
    """The benchmark's processes, each logging to a file of one temporary directory."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.pop("NOTIFY_SOCKET", None)      # the agents are no systemd services here

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:  # the child keeps its own descriptor
            p = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def __enter__(self) -> Procs:
        return self

    def stop(self) -> None:
        """SIGTERM to every process (the last started first), SIGKILL to those still
        running 8 s later."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def nginx_binary() -> str | None:
    """Debian's nginx, if installed (the benchmarks install nothing)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                     else None)


def parse_or_serve(ap: argparse.ArgumentParser,
                   serve_upstream: Callable[[int], None]) -> argparse.Namespace | None:
    """``ap``'s arguments with ``--json`` and the hidden ``--serve-upstream PORT`` (how
    :func:`start_pair` runs the script's upstream); None once that upstream has served."""
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return None
    return args


def start_pair(procs: Procs, script: str, stream_mb: int) -> tuple[int, int, int, int]:
    """The upstream (``script --serve-upstream PORT``), the caller and the worker, up and
    routed: (upstream, caller HTTP, worker HTTP, worker gateway) ports."""
    up = free_port()
    procs.spawn([sys.executable, script, "--serve-upstream", str(up)], "upstream.log")
    c_http, w_http, w_gw = write_configs(procs.tmp, up, stream_mb)
    procs.spawn([sys.executable, "-m", "agent", "run", "-c", str(procs.tmp / "caller.toml")],
                "caller.log")
    procs.spawn([sys.executable, "-m", "agent", "run", "-c", str(procs.tmp / "worker.toml")],
                "worker.log")
    wait_http(f"http://127.0.0.1:{up}/small")
    wait_http(f"http://127.0.0.1:{c_http}/readyz")
    wait_http(f"http://127.0.0.1:{w_http}/readyz")
    wait_http(f"http://127.0.0.1:{w_gw}/bench/small")
    wait_http(f"http://127.0.0.1:{c_http}/api/services/bench",
              ok=lambda b: isinstance(b, dict) and b.get("workers"))
    return up, c_http, w_http, w_gw
