"""The upstream's own signal, end to end: a real worker agent (and a coordinator) in
front of real servers on loopback that speak like inference servers.

- ``llm``: a vLLM-like stub whose ``/metrics`` says 50 requests are waiting (it counts
  every poll): the gateway's ``RMA-Load`` shows the queue, the worker's record in the
  DHT says full, ``/api/dht/stats`` and ``/metrics`` show the reading; while a request
  is in flight the stub sees polls at the busy pace, and none at the idle pace after
  (``RMA_AGENT_UPSTREAM_POLL_S=0.2,30``: counts of polls, no clock);
- ``ol``: the same stub as an Ollama upstream: once it answered a request 503 (its queue
  is full) the worker's ``RMA-Load`` says full;
- ``cpp``: the emulated inference server (``agent.cli.demo_inference``) loading its model,
  as a llama.cpp upstream: 503 "loading model" on its health endpoint, so the service is
  not announced (the worker is not ready and says why); once the model is loaded it is.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.cli.demo_inference import InferenceFarm, Profile
from agent.http.load_header import parse_load
from tests.cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.slow


class VllmStub:
    """``/metrics`` in vLLM's format with settable numbers (polls counted), ``/health``
    200, ``/v1/hold`` answers once ``release`` is set, anything else 200 at once."""

    def __init__(self) -> None:
        self.waiting = 50
        self.running = 1
        self.polls = 0
        self.release = threading.Event()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _r: web.Request) -> web.Response:
        self.polls += 1
        label = '{engine="0",model_name="stub"}'
        return web.Response(text=(
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self.running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(self.waiting)}\n"
            f"vllm:kv_cache_usage_perc{label} 0.5\n"))

    async def _hold(self, _r: web.Request) -> web.Response:
        # an upstream busy until the test (another thread) releases it: polling its
        # threading.Event keeps no executor thread per held request; at most 30 s
        for _ in range(1500):
            if self.release.is_set():
                break
            await asyncio.sleep(0.02)
        return web.json_response({"held": True})

    async def _other(self, _r: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _ps(self, _r: web.Request) -> web.Response:        # Ollama's loaded models
        return web.json_response({"models": [{"name": "gemma3", "model": "gemma3",
                                               "size": 6591830464, "size_vram": 5333539264}]})

    async def _busy(self, _r: web.Request) -> web.Response:      # Ollama's full queue
        return web.json_response({"error": "server busy, please try again.  maximum "
                                           "pending requests exceeded"}, status=503)

    def start(self) -> VllmStub:
        async def serve() -> str:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            app.router.add_get("/v1/hold", self._hold)
            app.router.add_get("/api/ps", self._ps)
            app.router.add_post("/api/generate", self._busy)
            app.router.add_route("*", "/{p:.*}", self._other)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def _announces(c1: Node, service: str, name: str) -> list[dict[str, Any]]:
    return [r for r in c1.provider_records(service)[0] if r["name"] == name]


def test_servers_own_load_and_readiness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setenv("RMA_AGENT_UPSTREAM_POLL_S", "0.2,30")
    vl = VllmStub().start()
    farm = InferenceFarm()
    try:
        cpp_url = farm.add(Profile(name="cpp", slots=2, mean_ms=1))
        cpp = farm.servers[0]
        farm.call(cpp.set_loading, True)
        with Cluster(tmp_path, record_ttl=20, republish=3) as cl:
            c1 = cl.coordinator("c1")
            cl.start(c1)
            cl.wait_ready(c1)
            w = cl.worker("w", [c1.dht_addr], services=["llm", "cpp", "ol"], extra={
                "gateway": {"upstreams": {"llm": {"url": vl.url, "kind": "vllm"},
                                          "cpp": {"url": cpp_url, "kind": "llamacpp"},
                                          "ol": {"url": vl.url, "kind": "ollama"}}}})
            cl.start(w)
            cl.wait_healthy(w)
            _loading_is_not_offered(c1, w)
            _server_queue_in_header_record_and_stats(c1, w, vl)
            polls_after = _polls_follow_the_requests(w, vl)
            farm.call(cpp.set_loading, False)          # the model is loaded
            wait_until(lambda: _announces(c1, "cpp", "w"), 20, "cpp announced once loaded")
            assert w.get("/readyz")[0] == 200
            assert "upstream of cpp is back" in w.log_text()
            # idle again: the servers' load is read at the idle pace (30 s) only
            assert vl.polls <= polls_after + 1, (vl.polls, polls_after)
            _ollama_full_queue(w)
    finally:
        farm.close()
        vl.stop()


def _loading_is_not_offered(c1: Node, w: Node) -> None:
    wait_until(lambda: _announces(c1, "llm", "w"), 20, "llm announced")
    # announced in the same record round as llm would have been: cpp is left out
    assert _announces(c1, "cpp", "w") == []
    up = w.get("/api/dht/stats")[1]["gateway"]["upstreams"]["cpp"]
    assert up["state"] == "down" and up["kind"] == "llamacpp"
    assert "loading model" in up["error"].lower() and "/health" in up["error"]
    status, body = w.get("/readyz")
    assert status == 503 and "cpp" in str(body)
    assert "upstream of cpp is down" in w.log_text()


def _server_queue_in_header_record_and_stats(c1: Node, w: Node, vl: VllmStub) -> None:
    status, headers = _get(w.gateway_url + "/llm/v1/models")
    assert status == 200
    load = parse_load(headers.get("RMA-Load"))
    assert load is not None and load.queue >= 50 and load.full, headers.get("RMA-Load")
    # the record: the worker re-announces its load (clamped to its capacity: full)
    wait_until(lambda: _announces(c1, "llm", "w")[0]["load"] >= 4, 20, "record load full")
    up = w.get("/api/dht/stats")[1]["gateway"]["upstreams"]["llm"]
    assert up["kind"] == "vllm" and up["reading"]["waiting"] == 50
    assert up["reading"]["kv_cache"] == 0.5 and up["age_s"] >= 0 and up["bad"] == 0
    metrics = urllib.request.urlopen(w.url + "/metrics", timeout=5).read().decode()
    assert 'rma_agent_gateway_upstream_queue{service="llm"} 50.0' in metrics
    assert 'rma_agent_gateway_upstream_running{service="llm"} 1.0' in metrics
    vl.waiting = 0                                   # the server's queue drains


def _polls_follow_the_requests(w: Node, vl: VllmStub) -> int:
    """Polls at the busy pace while a request is held; the count once it is done."""
    before = vl.polls
    done: list[tuple[int, dict[str, str]]] = []
    t = threading.Thread(target=lambda: done.append(_get(w.gateway_url + "/llm/v1/hold")))
    t.start()
    try:
        wait_until(lambda: vl.polls >= before + 6, 20, "busy-pace polls")
        # the drained queue is read too: the load is the held request alone
        wait_until(lambda: w.get("/api/dht/stats")[1]["gateway"]["load"] ==
                   {"inflight": 1, "queue": 0, "capacity": 4}, 10, "drained queue read")
    finally:
        vl.release.set()
        t.join(30)
    assert done and done[0][0] == 200
    return vl.polls


def _ollama_full_queue(w: Node) -> None:
    up = w.get("/api/dht/stats")[1]["gateway"]["upstreams"]["ol"]
    assert up["kind"] == "ollama" and up["reading"] == {"models": 1} and not up["full"]
    req = urllib.request.Request(w.gateway_url + "/ol/api/generate", data=b"{}",
                                 method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("the stub answers 503")
    except urllib.error.HTTPError as e:
        assert e.code == 503
    # the gateway's next answers say full, whatever their service (one worker, one load)
    load = parse_load(_get(w.gateway_url + "/llm/v1/models")[1].get("RMA-Load"))
    assert load is not None and load.full, load
    assert w.get("/api/dht/stats")[1]["gateway"]["upstreams"]["ol"]["full_seen"] == 1
