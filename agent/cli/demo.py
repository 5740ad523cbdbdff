"""``rma-agent demo``: a whole network on loopback in one command, stopped by Ctrl-C.

It starts one coordinator and N workers as real agent processes (``python -m agent run
-c <config>``), each with its own UDP (DHT) port, admin API and gateway on 127.0.0.1, its
own state dir, no tunnel, and its gateway as its endpoint (``http://127.0.0.1:<gateway
port>``). Each worker's gateway fronts a small real GPU service
(:mod:`agent.cli.demo_services`: it answers after a delay that follows the worker's GPU
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

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from agent.cli.common import ClientError, get_json
from agent.cli.demo_cluster import (
    FOUND_TIMEOUT_S,
    READY_TIMEOUT_S,
    DemoError,
    Node,
    expected_counts,
    log_tail,
    plan,
    report_load,
    start,
    stop_all,
    wait_found,
    wait_ready,
)
from agent.cli.demo_routing import routed_bursts
from agent.cli.demo_services import DemoServices
from agent.cli.lookup import format_lookup, lookup_url


class _Stop(Exception):
    """SIGTERM arrived: leave through the same clean-up path as Ctrl-C."""


def _start_cluster(nodes: list[Node], out: IO[str]) -> dict[str, int]:
    """Coordinator first, then the workers; until every worker is found. The counts
    every service should have."""
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
    return expected


def _print_lookups(coord: Node, expected: dict[str, int], out: IO[str]) -> None:
    """One ranked lookup per service, as ``rma-agent lookup`` prints it."""
    for service in expected:
        try:
            answer = get_json(lookup_url(coord.url, service))
            print("$ rma-agent lookup " + service + f" --url {coord.url}", file=out)
            print(format_lookup(answer), file=out)
        except ClientError as exc:
            print(f"lookup {service}: {exc}", file=out)
        print(file=out)


def _print_where_to_look(nodes: list[Node], out: IO[str]) -> None:
    """The agents and the coordinator's URLs worth opening."""
    coord = nodes[0]
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


def _keep_running(nodes: list[Node], out: IO[str]) -> None:
    """Until a signal: report an agent that exits on its own; the coordinator's exit
    ends the demo."""
    print("demo running — press Ctrl-C to stop", file=out, flush=True)
    while True:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is not None and not n.killed:
                print(f"{n.name} exited unexpectedly (status {n.proc.returncode}):\n"
                      f"{log_tail(n)}", file=out, flush=True)
                n.proc = None
                if n.role == "coordinator":
                    raise DemoError("the coordinator is gone; stopping the demo")
        time.sleep(0.5)


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
        expected = _start_cluster(nodes, out)
        _print_lookups(nodes[0], expected, out)
        routed_bursts(nodes[0], nodes, expected, out)
        _print_where_to_look(nodes, out)
        _keep_running(nodes, out)
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
