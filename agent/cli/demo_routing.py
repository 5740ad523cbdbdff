"""The demo's routed bursts: requests through the coordinator's router
(``/route/{service}/...``), how they spread over the workers, and a second burst during
which one worker is killed (SIGKILL) to show the router retrying elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from agent.cli.common import ClientError, get_json
from agent.cli.demo_cluster import Node
from agent.cli.demo_services import service_ms

BURST = 120                  # requests of the first routed burst
KILL_BURST = 300             # requests of the burst during which a worker is killed
BURST_CONCURRENCY = 4          # the demo's bursts stay within what the survivors can take


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
    """Requests per worker as bars (with each GPU class's service time), then the totals."""
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
