"""Selection for routed requests with real agents, gateways and emulated inference servers
(issue 17 item 3): a worker whose server reports a full queue gets no routed request
while others have room, and four routers sending at once do not herd onto one worker.

Four workers serve ``llm`` through a gateway in front of an emulated GPU server
(:mod:`agent.cli.demo_inference`, read as ``kind = "llamacpp"``: slots and queue from
its ``/slots`` and metrics). ``wq``'s server (one slot) is filled straight, not through
the agent: one request running, two queued. Its gateway reads that, puts it in its
record and headers. The routers of four agents (``c1`` and the three other workers) then
send requests at the same time.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.demo_inference import InferenceFarm, InferenceServer, Profile
from agent.http.load_header import parse_load
from tests.cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.slow

SLOTS = {"w1": 4, "w2": 4, "w3": 4, "wq": 1}
PER_CALLER = 25
SERVICE_MS = "30"


@pytest.fixture
def farm() -> Iterator[InferenceFarm]:
    f = InferenceFarm()
    try:
        yield f
    finally:
        f.close()


def _route(node: Node, i: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection(node.ip, node.http_port, timeout=30)
    try:
        conn.request("POST", f"/route/llm/v1/completions?n={i}", body=b'{"prompt": "hi"}',
                     headers={"Content-Type": "application/json",
                              "X-Emu-Service-Ms": SERVICE_MS})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("RMA-Worker", "")
    finally:
        conn.close()


def _gateway_load(node: Node) -> str | None:
    """The ``RMA-Load`` of any answer of ``node``'s gateway (a 404 will do)."""
    conn = http.client.HTTPConnection(node.ip, node.gateway_port, timeout=5)
    try:
        conn.request("GET", "/nothing-here")
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("RMA-Load")
    finally:
        conn.close()


def _offered_load(node: Node, wq_id: str) -> float:
    """wq's load as ``node``'s discovery now ranks it (a fresh lookup refreshes the cache
    the router reads)."""
    conn = http.client.HTTPConnection(node.ip, node.http_port, timeout=5)
    try:
        conn.request("GET", "/api/services/llm", headers={"Cache-Control": "no-cache"})
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return next((w["load"] for w in body.get("workers", []) if w["id"] == wq_id), -1.0)


def test_full_queue_gets_nothing_and_four_routers_spread(
        tmp_path: Path, farm: InferenceFarm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_AGENT_UPSTREAM_POLL_S", "0.2,0.3")   # gateways poll servers
    servers: dict[str, InferenceServer] = {}
    fill: list[socket.socket] = []
    with Cluster(tmp_path, record_ttl=30, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        for i, (name, slots) in enumerate(SLOTS.items()):
            url = farm.add(Profile(name=name, slots=slots, queue_limit=8, mean_ms=30,
                                   sigma=0.0, seed=i))
            servers[name] = farm.servers[-1]
            cl.worker(name, seeds=[c1.dht_addr], services=["llm"],
                      extra={"worker": {"max_concurrency": slots},
                             "gateway": {"upstreams": {"llm": {"url": url,
                                                               "kind": "llamacpp"}}}})
        workers = [cl.nodes[n] for n in SLOTS]
        cl.start(*workers)
        cl.wait_ready(*workers)
        wait_until(lambda: c1.providers("llm")[0] >= set(SLOTS), 30, "every worker announced")
        ids = {n: cl.nodes[n].node_id() for n in SLOTS}
        try:
            # wq's server: its one slot taken, two requests queued (not through the agent)
            host, port = farm_addr(servers["wq"])
            for k in range(3):
                s = socket.create_connection((host, port), timeout=5)
                s.sendall(f"POST /fill/{k} HTTP/1.1\r\nHost: x\r\nX-Emu-Service-Ms: 60000\r\n"
                          "Content-Length: 0\r\n\r\n".encode())
                fill.append(s)
            wait_until(lambda: farm.call(lambda: (servers["wq"].running,
                                                  servers["wq"].pool.waiting)) == (1, 2),
                       10, "wq's server full with two queued")
            # its gateway reads it (llama.cpp's /slots and metrics) and says so ...
            wait_until(lambda: (ld := parse_load(_gateway_load(cl.nodes["wq"]))) is not None
                       and ld.full and ld.queue >= 1, 15, "wq's gateway reports a full queue")
            callers = [c1] + [cl.nodes[n] for n in ("w1", "w2", "w3")]
            # ... and in its record, which each caller's discovery has fetched
            for node in callers:
                wait_until(lambda node=node: _offered_load(node, ids["wq"]) >= SLOTS["wq"],
                           15, f"{node.name} sees wq's record full")
            with concurrent.futures.ThreadPoolExecutor(len(callers)) as pool:
                results = list(pool.map(
                    lambda ci: [_route(callers[ci], i) for i in range(PER_CALLER)],
                    range(len(callers))))
            answers = [r for per in results for r in per]
            assert Counter(status for status, _ in answers) == {200: len(answers)}
            by_name = {v: k for k, v in ids.items()}
            served = Counter(by_name.get(w, w) for _, w in answers)
            # the full one got nothing: not in the answers, and nothing reached its server
            # but the three requests that filled it
            assert served["wq"] == 0, served
            wq_log = farm.call(lambda: [e for e in servers["wq"].log if e.kind == "request"])
            assert len(wq_log) == 3, wq_log
            # no herding: four routers at once spread over the three with room
            total = len(answers)
            for name in ("w1", "w2", "w3"):
                assert 0.15 * total <= served[name] <= 0.6 * total, served
            # the router's cost parts, per worker, in ?explain=1
            status, expl = c1.get("/api/services/llm?explain=1", timeout=10)
            assert status == 200
            router = {by_name[w["id"]]: w["router"] for w in expl["workers"]}
            for parts in router.values():
                assert {"outstanding", "queue", "capacity", "ewma_ms", "penalty",
                        "retry_after", "cost"} <= set(parts)
            assert router["wq"]["capacity"] == 1
            assert router["wq"]["cost"] > max(router[n]["cost"] for n in ("w1", "w2", "w3"))
            assert router["w1"]["measured"] or router["w2"]["measured"]
            status, text = c1.get("/metrics")
            assert 'rma_agent_router_picks_total{how="p2c"}' in text
        finally:
            for s in fill:
                s.close()


def farm_addr(server: InferenceServer) -> tuple[str, int]:
    """(host, port) of an emulated server started by the farm."""
    url = server.url
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port)
