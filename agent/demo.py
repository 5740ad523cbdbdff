"""``rma-agent demo``: a whole network on loopback in one command, stopped by Ctrl-C.

It starts one coordinator and N workers as real agent processes (``python -m agent run
-c <config>``), each with its own UDP (DHT) port, admin API and gateway on 127.0.0.1, its
own state dir, no tunnel, and its gateway as its endpoint (``http://127.0.0.1:<gateway
port>``). Each worker's gateway fronts a small real GPU service
(:mod:`agent.demo_services`: it answers after a delay that follows the worker's GPU
class). Workers differ in GPU, capacity (``max_concurrency``), region and services. The
demo waits until every agent is ready and every worker is found through the DHT, prints
one ranked lookup per service (asked of the coordinator), then sends a burst of requests
through the coordinator's router (``/route/{service}/...``) and prints how they spread
over the workers; then a second burst during which one worker is killed (SIGKILL) and
shows that no request failed (the router retried them elsewhere); then the URLs to look
at, and waits.

Ctrl-C (SIGINT) or SIGTERM stops everything: workers first (they withdraw their records),
then the coordinator, each with SIGTERM and a bounded wait, SIGKILL for stragglers; the
temporary directory (configs, state, logs) is removed. The agents run in their own
session, so a terminal's Ctrl-C reaches only the demo, which stops them in order; and
they get SIGTERM from the kernel if the demo itself dies (``PR_SET_PDEATHSIG``), so no
agent outlives it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.config import toml_dumps
from agent.demo_services import DemoServices, service_ms
from agent.discovery.client import ClientError, format_lookup, get_json, lookup_url

READY_TIMEOUT_S = 60.0       # two shared cores: Python start-up of N+1 agents takes a while
FOUND_TIMEOUT_S = 45.0
STOP_GRACE_S = 6.0
REPUBLISH_S = 10             # faster than the default 30 s so the demo converges quickly
BURST = 120                  # requests of the first routed burst
KILL_BURST = 300             # requests of the burst during which a worker is killed
BURST_CONCURRENCY = 4          # the demo's bursts stay within what the survivors can take

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


class _Stop(Exception):
    """SIGTERM arrived: leave through the same clean-up path as Ctrl-C."""


@dataclass
class Node:
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


# ---------------------------------------------------------------------- helpers
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
    coord.config.write_text(toml_dumps({
        "agent": {"role": "coordinator", "name": coord.name, "region": "eu-west",
                  "state_dir": str(tmp / "state-coordinator")},
        "dht": {"listen": f"127.0.0.1:{udp}", "mode": "server",
                "republish_interval": REPUBLISH_S},
        "http": {"listen": f"127.0.0.1:{http}"},
        "gateway": {"listen": f"127.0.0.1:{coord.gateway_port}"},
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
            upstream = services.add(name, gpu)
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
            "discovery": {"coordinators": [coord.url]},
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
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
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


def _log_tail(node: Node, lines: int = 15) -> str:
    try:
        text = node.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (empty log)"


class DemoError(Exception):
    pass


def wait_ready(nodes: list[Node], timeout: float) -> None:
    """Until every node answers 200 on /readyz; a node that exits is an error."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for node in list(pending):
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise DemoError(f"{node.name} exited with status {node.proc.returncode}:\n"
                                f"{_log_tail(node)}")
            if _http_status(node.url + "/readyz") == 200:
                pending.remove(node)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(n.name for n in pending)
            raise DemoError(f"not ready after {timeout:.0f} s: {names}\n{_log_tail(pending[0])}")
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


# ---------------------------------------------------------------------- routed bursts
@dataclass
class Burst:
    """What one burst through the router came to."""

    total: int
    statuses: Counter[int] = field(default_factory=Counter)
    by_worker: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)


def route_once(url: str, service: str, i: int) -> tuple[int, str, int]:
    """One ``GET /route/{service}/v1/run``: (status, worker id, attempts); status 0 when
    the agent could not be reached."""
    req = urllib.request.Request(f"{url}/route/{service}/v1/run?request={i}")
    try:
        with urllib.request.urlopen(req, timeout=30.0) as resp:
            resp.read()
            status, headers = int(resp.status), resp.headers
    except urllib.error.HTTPError as exc:
        exc.read()
        status, headers = int(exc.code), exc.headers
    except (urllib.error.URLError, OSError):
        return 0, "", 0
    try:
        attempts = int(headers.get("RMA-Attempts") or 0)
    except ValueError:
        attempts = 0
    return status, headers.get("RMA-Worker") or "", attempts


def burst(url: str, service: str, n: int, during: Callable[[], None] | None = None,
          at: int = 0) -> Burst:
    """``n`` routed requests, ``BURST_CONCURRENCY`` at a time; ``during()`` runs once
    ``at`` of them have been answered."""
    out = Burst(n)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(BURST_CONCURRENCY) as pool:
        futures = [pool.submit(route_once, url, service, i) for i in range(n)]
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            status, worker, attempts = fut.result()
            out.statuses[status] += 1
            if status == 200:
                out.by_worker[worker] += 1
            if attempts > 1:
                out.retried += 1
            if during is not None and done == at:
                during()
    out.seconds = time.monotonic() - t0
    return out


def print_spread(b: Burst, names: dict[str, Node], out: IO[str]) -> None:
    most = max(b.by_worker.values(), default=1)
    for wid, count in b.by_worker.most_common():
        node = names.get(wid)
        label = node.name if node else wid[:12]
        gpu = node.gpu if node else "?"
        ms = f"{service_ms(gpu):.0f} ms/request" if node else ""
        bar = "#" * max(1, round(30 * count / most))
        print(f"  {label:<10} {gpu:<9} {ms:>15} {count:5d} requests  {bar}", file=out)
    failed = b.total - b.ok
    print(f"  {b.ok} of {b.total} answered 200 in {b.seconds:.1f} s"
          + (f", {failed} failed ({dict(b.statuses)})" if failed else "")
          + f"; {b.retried} needed another worker", file=out, flush=True)


def worker_ids(nodes: list[Node]) -> dict[str, Node]:
    """Worker id (hex) -> node, from each worker's own stats."""
    out = {}
    for n in nodes:
        if n.role != "worker":
            continue
        try:
            out[str(get_json(n.url + "/api/dht/stats")["node_id"])] = n
        except (ClientError, KeyError, TypeError):
            pass
    return out


def routed_bursts(coord: Node, nodes: list[Node], expected: dict[str, int],
                  out: IO[str]) -> None:
    """The router at work: a burst, then a burst during which a worker is killed."""
    service = max(expected, key=lambda s: (expected[s], s))
    names = worker_ids(nodes)
    print(f"$ {BURST} requests to {coord.url}/route/{service}/v1/run "
          f"({BURST_CONCURRENCY} at a time)", file=out, flush=True)
    first = burst(coord.url, service, BURST)
    print_spread(first, names, out)
    print(file=out)
    serving = [n for n in nodes if n.role == "worker" and service in n.services
               and n.proc is not None and n.proc.poll() is None]
    if len(serving) < 2:
        return
    # the victim: the worker that served most among those whose loss still leaves room
    # for the burst (a full worker's 503 + RMA-Not-Processed, when no other worker has a
    # free slot, goes back to the caller: that is overload, not a lost request)
    served = {node.name: c for wid, c in first.by_worker.items() if (node := names.get(wid))}
    total = sum(n.capacity for n in serving)
    spare = [n for n in serving if total - n.capacity >= BURST_CONCURRENCY] or serving
    busiest = max(spare, key=lambda n: (served.get(n.name, 0), -n.capacity))
    at = KILL_BURST // 3

    def kill() -> None:
        assert busiest.proc is not None
        busiest.proc.kill()
        busiest.proc.wait(5)
        busiest.killed = True
        print(f"  ... {at} answered: killed {busiest.name} (SIGKILL, pid "
              f"{busiest.proc.pid})", file=out, flush=True)

    print(f"$ {KILL_BURST} more; {busiest.name} is killed (SIGKILL) after {at} of them",
          file=out, flush=True)
    second = burst(coord.url, service, KILL_BURST, during=kill, at=at)
    print_spread(second, names, out)
    if second.ok == second.total:
        print("  no request failed: the router retried the killed worker's requests on "
              "the others", file=out, flush=True)
    print(file=out)


# ---------------------------------------------------------------------- main
def main(workers: int = 5, out: IO[str] | None = None) -> int:
    """Run the demo until SIGINT/SIGTERM; 0 after a clean stop, 1 if it could not start."""
    out = out or sys.stdout
    tmp = Path(tempfile.mkdtemp(prefix="rma-agent-demo-"))
    nodes: list[Node] = []
    services: DemoServices | None = None
    code = 0

    def on_term(_sig: int, _frame: Any) -> None:
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must work even when started with SIGINT ignored (e.g. from a script's "&")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"rma-agent demo: 1 coordinator + {workers} workers on 127.0.0.1 "
              f"(files in {tmp})", file=out, flush=True)
        services = DemoServices()
        nodes = plan(workers, tmp, services)
        coord = nodes[0]
        start(coord)
        wait_ready([coord], READY_TIMEOUT_S)
        for n in nodes[1:]:
            start(n)
        wait_ready(nodes[1:], READY_TIMEOUT_S)
        for n in nodes[1:]:
            report_load(n)
        print(f"all {len(nodes)} agents are ready; waiting for the DHT to find every worker",
              file=out, flush=True)
        expected = expected_counts(nodes)
        found = wait_found(coord, expected, FOUND_TIMEOUT_S)
        if found != expected:
            print(f"warning: found {found}, expected {expected} (continuing)", file=out,
                  flush=True)
        print(file=out)
        for service in expected:
            try:
                answer = get_json(lookup_url(coord.url, service))
                print("$ rma-agent lookup " + service + f" --url {coord.url}", file=out)
                print(format_lookup(answer), file=out)
            except ClientError as exc:
                print(f"lookup {service}: {exc}", file=out)
            print(file=out)
        routed_bursts(coord, nodes, expected, out)
        print("agents:", file=out)
        for n in nodes:
            extra = f"  services: {', '.join(n.services)}" if n.services else ""
            gw = f"  gateway http://127.0.0.1:{n.gateway_port}" if n.role == "worker" else ""
            state = "killed by the demo" if n.killed else \
                f"pid {n.proc.pid if n.proc else '-'}"
            print(f"  {n.name:<12} {n.url}  ({state}){gw}{extra}", file=out)
        print(file=out)
        print(f"dashboard:  {coord.url}/", file=out)
        print(f"route:      {coord.url}/route/<service>/<path>   "
              f"(rma-agent call <service> <path> --url {coord.url})", file=out)
        print(f"stats:      {coord.url}/api/dht/stats   (rma-agent status --url {coord.url})",
              file=out)
        print(f"services:   {coord.url}/api/services", file=out)
        print(f"metrics:    {coord.url}/metrics", file=out)
        print(f"topology:   {coord.url}/api/dht/topology", file=out)
        print(file=out)
        print("demo running — press Ctrl-C to stop", file=out, flush=True)
        while True:
            for n in nodes:
                if n.proc is not None and n.proc.poll() is not None and not n.killed:
                    print(f"{n.name} exited unexpectedly (status {n.proc.returncode}):\n"
                          f"{_log_tail(n)}", file=out, flush=True)
                    n.proc = None
                    if n.role == "coordinator":
                        raise DemoError("the coordinator is gone; stopping the demo")
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=out, flush=True)
    except (DemoError, RuntimeError, OSError) as exc:
        print(f"rma-agent demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # a second Ctrl-C must not abort the clean-up half way
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop_all(nodes, out)
            if services is not None:
                services.close()
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"stopped {len(nodes)} agents, "
                  f"removed {tmp}", file=out, flush=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    return code
