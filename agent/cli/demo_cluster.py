"""The demo's cluster: one coordinator and N worker processes on 127.0.0.1.

``plan`` writes each agent's config (own UDP, admin and gateway ports, state dir, no
tunnel, its gateway as its endpoint), ``start`` runs it as ``python -m agent run`` in its
own session (SIGTERM from the kernel if the demo dies: ``PR_SET_PDEATHSIG``),
``wait_ready``/``wait_found`` wait for ``/readyz`` and for lookups to find every worker,
``stop_all`` stops workers first (they withdraw), then the coordinator.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.cli.demo_services import DemoServices
from agent.cli.lookup import lookup_url
from agent.config import toml_dumps

READY_TIMEOUT_S = 60.0       # two shared cores: Python start-up of N+1 agents takes a while
FOUND_TIMEOUT_S = 45.0
STOP_GRACE_S = 6.0
REPUBLISH_S = 10             # faster than the default 30 s so the demo converges quickly

# (gpu, memory GB, region, services, max_concurrency, requests in flight), cycled over
# the workers; the in-flight count is reported the way a real service on the box would,
# through PUT /api/worker/load, so the demo's rankings show load at work
PROFILES: tuple[tuple[str, float, str, tuple[str, ...], int, int], ...] = (
    ("H100", 80.0, "eu-west", ("llm-inference", "ocr"), 8, 6),
    ("A100", 40.0, "us-east", ("llm-inference",), 4, 1),
    ("RTX 4090", 24.0, "eu-west", ("ocr", "embeddings"), 2, 0),
    ("T4", 16.0, "ap-south", ("ocr",), 1, 1),
    ("L40S", 48.0, "us-east", ("embeddings", "llm-inference"), 4, 2),
)


@dataclass
class Node:
    """One agent process of the demo: its ports, config, log, and what it serves."""

    name: str
    role: str
    http_port: int
    udp_port: int
    config: Path
    log_path: Path
    services: tuple[str, ...] = ()
    inflight: int = 0
    gateway_port: int = 0
    gpu: str = ""
    capacity: int = 0
    killed: bool = False          # stopped on purpose by the demo (mid-burst)
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gateway_port(taken: set[int]) -> int:
    """A free TCP port for a node's gateway listener (every agent serves one)."""
    for _ in range(200):
        port = _free_port(socket.SOCK_STREAM)
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free ports on 127.0.0.1")


def _ports(taken: set[int]) -> tuple[int, int]:
    """(udp, tcp) ports, each free now and distinct from the ones already handed out."""
    for _ in range(200):
        udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
        if udp != tcp and not {udp, tcp} & taken:
            taken.update((udp, tcp))
            return udp, tcp
    raise RuntimeError("no free ports on 127.0.0.1")


def plan(workers: int, tmp: Path, services: DemoServices | None = None) -> list[Node]:
    """Configs for one coordinator and ``workers`` workers, written into ``tmp``; with
    ``services``, each worker's gateway fronts a demo GPU service started there."""
    taken: set[int] = set()
    udp, http = _ports(taken)
    coord = Node("coordinator", "coordinator", http, udp, tmp / "coordinator.toml",
                 tmp / "coordinator.log", gateway_port=_gateway_port(taken))
    nodes = [coord]
    common = {"tunnel": {"mode": "off"}, "log": {"level": "warning"}}
    # the whole demo runs on this box's loopback: callers may contact it
    local = ["127.0.0.1"]
    coord.config.write_text(toml_dumps({
        "agent": {"role": "coordinator", "name": coord.name, "region": "eu-west",
                  "state_dir": str(tmp / "state-coordinator")},
        "dht": {"listen": f"127.0.0.1:{udp}", "mode": "server",
                "republish_interval": REPUBLISH_S},
        "http": {"listen": f"127.0.0.1:{http}"},
        "gateway": {"listen": f"127.0.0.1:{coord.gateway_port}"},
        "discovery": {"allow_private_hosts": local},
        **common,
    }))
    for i in range(workers):
        gpu, mem, region, served, conc, inflight = PROFILES[i % len(PROFILES)]
        wudp, whttp = _ports(taken)
        name = f"worker-{i + 1}"
        node = Node(name, "worker", whttp, wudp, tmp / f"{name}.toml", tmp / f"{name}.log",
                    served, inflight, gateway_port=_gateway_port(taken), gpu=gpu,
                    capacity=conc)
        gateway: dict[str, Any] = {"listen": f"127.0.0.1:{node.gateway_port}"}
        if services is not None:
            upstream = services.add(name, gpu, conc)
            gateway["upstreams"] = {svc: upstream for svc in node.services}
        node.config.write_text(toml_dumps({
            "agent": {"role": "worker", "name": name, "region": region,
                      "state_dir": str(tmp / f"state-{name}")},
            "dht": {"listen": f"127.0.0.1:{wudp}", "mode": "server",
                    "bootstrap": [f"127.0.0.1:{udp}"], "republish_interval": REPUBLISH_S},
            "http": {"listen": f"127.0.0.1:{whttp}"},
            "gateway": gateway,
            "worker": {"services": list(node.services),
                       "endpoint": f"http://127.0.0.1:{node.gateway_port}",
                       "max_concurrency": conc, "gpu": gpu, "gpu_memory_gb": mem},
            "discovery": {"coordinators": [coord.url], "allow_private_hosts": local},
            **common,
        }))
        nodes.append(node)
    return nodes


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the demo process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the demo's own clean-up still applies
        pass


def start(node: Node) -> None:
    """Start ``node`` as ``python -m agent run``, in its own session, dying with the demo."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])   # the tree holding agent/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                else "")
    env.pop("NOTIFY_SOCKET", None)   # the demo's agents are not systemd services
    env.pop("WATCHDOG_USEC", None)
    node.log_file = open(node.log_path, "wb")
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "-c", str(node.config)],
        stdin=subprocess.DEVNULL, stdout=node.log_file, stderr=subprocess.STDOUT, env=env,
        start_new_session=True, preexec_fn=_die_with_parent)


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def log_tail(node: Node, lines: int = 15) -> str:
    try:
        text = node.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (empty log)"


class DemoError(Exception):
    """The demo cannot go on (an agent exited, never got ready): one message, exit 1."""


def wait_ready(nodes: list[Node], timeout: float) -> None:
    """Until every node answers 200 on /readyz; a node that exits is an error."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for node in list(pending):
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise DemoError(f"{node.name} exited with status {node.proc.returncode}:\n"
                                f"{log_tail(node)}")
            if _http_status(node.url + "/readyz") == 200:
                pending.remove(node)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(n.name for n in pending)
            raise DemoError(f"not ready after {timeout:.0f} s: {names}\n{log_tail(pending[0])}")
        time.sleep(0.2)


def report_load(node: Node) -> None:
    """Tell a worker its requests in flight, as the service it fronts would."""
    req = urllib.request.Request(node.url + "/api/worker/load", method="PUT",
                                 data=json.dumps({"inflight": node.inflight}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=2.0):
            pass
    except OSError as exc:  # a demo nicety: the cluster works without it
        print(f"warning: could not set the load of {node.name}: {exc}", file=sys.stderr)


def expected_counts(nodes: list[Node]) -> dict[str, int]:
    """Service -> how many workers serve it (what lookups should find)."""
    counts: dict[str, int] = {}
    for n in nodes:
        for s in n.services:
            counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))


def fresh_lookup(url: str, service: str) -> dict[str, Any]:
    """A lookup that bypasses the agent's cache (``Cache-Control: no-cache``)."""
    req = urllib.request.Request(lookup_url(url, service), headers={"Cache-Control": "no-cache"})
    with urllib.request.urlopen(req, timeout=5.0) as resp:
        return json.loads(resp.read())


def wait_found(coord: Node, expected: dict[str, int], timeout: float) -> dict[str, int]:
    """Until the coordinator finds every worker of every service; the counts it found."""
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while True:
        for service, want in expected.items():
            if found.get(service) == want:
                continue
            try:
                found[service] = len(fresh_lookup(coord.url, service).get("workers", []))
            except (urllib.error.URLError, OSError, ValueError):
                found[service] = 0
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def stop_all(nodes: list[Node], out: IO[str]) -> None:
    """Workers first (they withdraw), then the coordinator; SIGKILL after a grace time."""
    workers = [n for n in nodes if n.role == "worker"]
    coords = [n for n in nodes if n.role != "worker"]
    for group in (workers, coords):
        live = [n for n in group if n.proc is not None and n.proc.poll() is None]
        for n in live:
            with contextlib.suppress(ProcessLookupError):
                n.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + STOP_GRACE_S
        for n in live:
            assert n.proc is not None
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {n.name} did not stop in {STOP_GRACE_S:.0f} s: killing it", file=out,
                      flush=True)
                n.proc.kill()
                n.proc.wait(5)
    for n in nodes:
        if n.log_file is not None:
            n.log_file.close()
