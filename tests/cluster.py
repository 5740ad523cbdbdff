"""A harness for tests that run a network of real agent processes on loopback.

Each node is ``python -m agent run -c CFG`` with its own TOML config, state dir and log
file, its own 127.x.y.z address (so ports never collide with other tests running at the
same time) and real UDP between processes. ``Cluster`` is a context manager: on exit every
process it started gets SIGTERM, then SIGKILL — nothing outlives a test, even a failing one.

Timings are kept small (``record_ttl``/``republish_interval``) so tests stay fast.

Usage::

    with Cluster(tmp_path, record_ttl=12, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        w = cl.worker("w1", seeds=[c1.dht_addr], services=["ocr"], mode="client")
        cl.start(w)
        cl.wait_ready(w)
        names, lookup_ms, http_ms = c1.providers("ocr")     # GET /api/dht/providers/ocr
        cl.kill(w)                                           # SIGKILL; cl.stop(w) = SIGTERM

Nodes in other network namespaces: ``cl.worker(..., ip=ADDR, exec_prefix=lab.exec_argv(h))``
(see tests/dht/test_cluster_nat.py). Logs: ``node.log_path`` / ``cl.logs_tail()``.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import toml_dumps
from tests.util import (
    REPO,
    agent_env,
    free_port,
    free_udp_tcp_port,
    http,
    stop_process,
    wait_for,
)

__all__ = ["REPO", "AgentProcess", "Cluster", "Node", "die_with_parent", "http", "join_argv",
           "join_ports", "percentile", "wait_until"]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """``tests.util.wait_for`` (the one polling helper) with the argument order older
    cluster tests use; new code calls ``wait_for(pred, timeout, what=...)``."""
    return wait_for(pred, timeout, interval, what)


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by SIGKILL
    (a teardown that never runs must still leave no agent behind). Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------- workers made by ``join``
def join_ports() -> dict[str, int]:
    """Free loopback ports for a worker ``rma-agent join`` configures: its DHT (``udp``),
    its HTTP API (``http``) and its gateway (``gw``)."""
    return {"udp": free_udp_tcp_port(), "http": free_port(), "gw": free_port()}


def join_argv(coordinator: str, workdir: Path, ports: dict[str, int], service: str,
              name: str, *extra: str) -> list[str]:
    """``rma-agent join`` for a worker whose config (``agent.toml``) and state
    (``state/``) live in ``workdir``, listening on ``ports``, its gateway the endpoint;
    ``--no-start``: a test starts the agent itself (:class:`AgentProcess`)."""
    return [sys.executable, "-m", "agent", "join", coordinator,
            "--service", service, "--name", name,
            "-c", str(workdir / "agent.toml"), "--state-dir", str(workdir / "state"),
            "--endpoint", f"http://127.0.0.1:{ports['gw']}",
            "--dht-listen", f"127.0.0.1:{ports['udp']}",
            "--http-listen", f"127.0.0.1:{ports['http']}",
            "--gateway-listen", f"127.0.0.1:{ports['gw']}", "--no-start", *extra]


class AgentProcess:
    """``rma-agent run -c CFG`` outside a :class:`Cluster` (a config ``join`` wrote),
    appending to ``log``; it dies with the test process, and ``stop`` ends it (SIGTERM,
    SIGKILL after 10 s) and closes the log."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")     # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                                     cwd=REPO, env=agent_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


# ----------------------------------------------------------------------------- nodes
@dataclass
class Node:
    name: str
    role: str
    ip: str
    udp_port: int
    http_port: int
    state_dir: Path
    cfg_path: Path
    log_path: Path
    data: dict[str, dict[str, Any]]
    proc: subprocess.Popen[bytes] | None = None
    # a command prefix running the agent elsewhere (e.g. ``ip netns exec NS``); HTTP
    # requests then run through ``curl`` under the same prefix
    exec_prefix: tuple[str, ...] = ()
    http_host: str = ""
    gateway_port: int = 0
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.http_host or self.ip}:{self.http_port}"

    @property
    def gateway_url(self) -> str:
        """The node's public listener (``gateway.listen``)."""
        return f"http://{self.http_host or self.ip}:{self.gateway_port}"

    @property
    def dht_addr(self) -> str:
        return f"{self.ip}:{self.udp_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, Any]:
        if self.exec_prefix:
            return self._curl("GET", path, None, timeout)
        return http("GET", self.url + path, timeout=timeout)

    def post(self, path: str, body: Any = None, raw: bytes | None = None,
             timeout: float = 5.0) -> tuple[int, Any]:
        if self.exec_prefix:
            return self._curl("POST", path, json.dumps(body).encode() if body is not None
                              else (raw or b""), timeout)
        return http("POST", self.url + path, body=body, raw=raw, timeout=timeout)

    def _curl(self, method: str, path: str, data: bytes | None,
              timeout: float) -> tuple[int, Any]:
        cmd = [*self.exec_prefix, "curl", "-sS", "-m", str(timeout), "-X", method,
               "-o", "-", "-w", "\n%{http_code}", self.url + path]
        if data is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        try:
            res = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return 0, None
        payload, _, code = res.stdout.rpartition(b"\n")
        if res.returncode != 0 or not code.strip().isdigit():
            return 0, None
        try:
            return int(code), json.loads(payload)
        except ValueError:
            return int(code), payload.decode("utf-8", "replace")

    def node_id(self) -> str:
        status, stats = self.get("/api/dht/stats")
        assert status == 200, f"{self.name}: /api/dht/stats -> {status} {stats}"
        return str(stats["node_id"])

    def providers(self, service: str) -> tuple[set[str], float, float]:
        """(names of live workers found, lookup ms inside the agent, HTTP round trip ms)."""
        records, ms, rtt = self.provider_records(service)
        return {r["name"] for r in records}, ms, rtt

    def provider_records(self, service: str) -> tuple[list[dict[str, Any]], float, float]:
        """(records as JSON, lookup ms inside the agent, HTTP round trip ms)."""
        t0 = time.perf_counter()
        status, body = self.get(f"/api/dht/providers/{service}", timeout=5.0)
        rtt = (time.perf_counter() - t0) * 1000
        assert status == 200, f"{self.name}: providers({service}) -> {status} {body}"
        return list(body["records"]), float(body["elapsed_ms"]), rtt

    def write_config(self) -> None:
        self.cfg_path.write_text(toml_dumps(self.data))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Cluster:
    """Starts, inspects and always tears down a set of agent processes."""

    def __init__(self, tmp: Path, *, record_ttl: int = 20, republish: int = 3,
                 ksize: int = 20) -> None:
        self.tmp = Path(tmp)
        self.record_ttl = record_ttl
        self.republish = republish
        self.ksize = ksize
        self.nodes: dict[str, Node] = {}
        # one 127.a.b.0/24 per cluster: never collides with 127.0.0.1 users or other clusters
        self._net = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"
        self._next_host = 1

    # -- building ------------------------------------------------------------------
    def _new_ip(self) -> str:
        ip = f"{self._net}.{self._next_host}"
        self._next_host += 1
        if self._next_host > 254:
            raise RuntimeError("more than 254 nodes in one cluster")
        return ip

    def add(self, name: str, role: str, *, seeds: Iterable[str] = (), mode: str = "server",
            services: Iterable[str] = ("ocr",), coordinators: Iterable[str] = (),
            extra: dict[str, dict[str, Any]] | None = None, ip: str | None = None,
            exec_prefix: Iterable[str] = ()) -> Node:
        """A node config. ``ip`` + ``exec_prefix`` place it in another network namespace
        (fixed ports there: UDP 8468 on ``ip``, HTTP 8080 and the gateway 8090 on that
        namespace's loopback)."""
        prefix = tuple(exec_prefix)
        if prefix:
            assert ip, "a node run under a prefix needs its address"
            udp, http_port, http_host, gw_port = 8468, 8080, "127.0.0.1", 8090
        else:
            ip = ip or self._new_ip()
            udp = free_udp_tcp_port(ip)
            http_port = free_port(socket.SOCK_STREAM, ip)
            http_host = ip
            gw_port = free_port(socket.SOCK_STREAM, ip)
            while gw_port == http_port:
                gw_port = free_port(socket.SOCK_STREAM, ip)
        state = self.tmp / name / "state"
        state.mkdir(parents=True, exist_ok=True)
        data: dict[str, dict[str, Any]] = {
            "agent": {"role": role, "name": name, "region": "test", "state_dir": str(state)},
            "dht": {"listen": f"{ip}:{udp}", "bootstrap": list(seeds), "mode": mode,
                    "ksize": self.ksize, "record_ttl": self.record_ttl,
                    "republish_interval": self.republish},
            "http": {"listen": f"{http_host}:{http_port}"},
            "gateway": {"listen": f"{http_host}:{gw_port}"},
            "tunnel": {"mode": "off"},
            # every node is on loopback: callers may contact it (discovery.endpoints)
            "discovery": {"coordinators": list(coordinators),
                          "allow_private_hosts": ["127.0.0.0/8", "::1"]},
            "log": {"level": "info"},
        }
        if role == "worker":
            data["worker"] = {"services": list(services),
                              "endpoint": f"http://{http_host}:{gw_port}",
                              "max_concurrency": 4, "gpu": "T4", "gpu_memory_gb": 16}
        for section, values in (extra or {}).items():
            data.setdefault(section, {}).update(values)
        node = Node(name, role, ip, udp, http_port, state, self.tmp / name / "agent.toml",
                    self.tmp / name / "agent.log", data, exec_prefix=prefix,
                    http_host=http_host, gateway_port=gw_port)
        node.write_config()
        self.nodes[name] = node
        return node

    def coordinator(self, name: str, seeds: Iterable[str] = (), **kw: Any) -> Node:
        return self.add(name, "coordinator", seeds=seeds, **kw)

    def worker(self, name: str, seeds: Iterable[str], **kw: Any) -> Node:
        return self.add(name, "worker", seeds=seeds, **kw)

    # -- processes -----------------------------------------------------------------
    def start(self, *nodes: Node, launcher: Iterable[str] = ("-m", "agent")) -> None:
        """Start ``python LAUNCHER run -c CFG`` for each node. ``launcher`` replaces
        ``-m agent`` where a test runs the same code differently (tests/test_versions.py
        runs agents that believe they are another version)."""
        env = agent_env()
        for node in nodes:
            assert not node.alive(), f"{node.name} already running"
            node.write_config()
            node._log = open(node.log_path, "ab")  # closed in _reap
            node.proc = subprocess.Popen(
                [*node.exec_prefix, sys.executable, *launcher, "run", "-c",
                 str(node.cfg_path)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=node._log,
                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def wait_ready(self, *nodes: Node, timeout: float = 30.0) -> None:
        pending = list(nodes)

        def check() -> bool:
            for n in list(pending):
                if not n.alive():
                    raise AssertionError(f"{n.name} exited with {n.proc.returncode if n.proc else None}"
                                         f":\n{n.log_text()[-3000:]}")
                if n.get("/readyz", timeout=1.0)[0] == 200:
                    pending.remove(n)
            return not pending

        try:
            wait_until(check, timeout, "readiness", interval=0.2)
        except AssertionError as exc:
            detail = "\n".join(f"--- {n.name}: {n.get('/readyz', 1.0)}\n{n.log_text()[-1500:]}"
                               for n in pending[:3])
            raise AssertionError(f"{exc}; not ready: {[n.name for n in pending]}\n{detail}") from None

    def wait_healthy(self, *nodes: Node, timeout: float = 20.0) -> None:
        for n in nodes:
            wait_until(lambda n=n: n.alive() and n.get("/healthz", 1.0)[0] == 200, timeout,
                       f"{n.name} /healthz")

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)

    def stop(self, node: Node, timeout: float = 8.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        self._reap(node)
        return node.proc.returncode

    def _reap(self, node: Node) -> None:
        if node._log is not None:
            node._log.close()
            node._log = None

    def close(self) -> None:
        """SIGTERM everything at once, SIGKILL what is left after 5 s."""
        running = [n for n in self.nodes.values() if n.alive()]
        for n in running:
            try:
                n.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        for n in running:
            assert n.proc is not None
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                try:
                    n.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:   # belt and braces
                n.proc.kill()
            self._reap(n)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------
    def live(self, role: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive() and (role is None or n.role == role)]

    def parallel(self, fn: Callable[[Node], Any], nodes: Iterable[Node],
                 workers: int = 8) -> dict[str, Any]:
        """``fn(node)`` for each node on a small thread pool; {name: result}."""
        nodes = list(nodes)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(fn, nodes))
        return {n.name: r for n, r in zip(nodes, results, strict=True)}

    def logs_tail(self, nodes: Iterable[Node] | None = None, chars: int = 1200) -> str:
        out = []
        for n in nodes if nodes is not None else self.nodes.values():
            out.append(f"--- {n.name} ({n.log_path})\n{n.log_text()[-chars:]}")
        return "\n".join(out)


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, int(q * len(xs)))]
