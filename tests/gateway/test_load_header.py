"""``RMA-Load`` end to end: real agent processes, a real upstream (issue 17, item 1).

Coordinator ``c1`` is the caller (its router); worker ``w1`` fronts ``svc`` (upstream
``tests.gateway.upstream``) with ``max_concurrency = 1``. The worker's gateway puts its
load on proxied answers, its own 503s, the ownership proof and a 404; the caller's router
takes the load of each answer in, and its stats show the worker's load change with the
answers (state, not time).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.http.load_header import Load, parse_load
from agent.proof import PROOF_PATH, new_nonce
from tests.cluster import Cluster, Node, wait_until
from tests.gateway.upstream import Upstream
from tests.util import free_port, wait_for_async

pytestmark = pytest.mark.slow


class Net:
    def __init__(self, c1: Node, w1: Node, up: Upstream) -> None:
        self.c1, self.w1, self.up = c1, w1, up


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    up = Upstream().start()
    tmp = Path(tmp_path_factory.mktemp("load"))
    try:
        with Cluster(tmp, record_ttl=30, republish=3) as cl:
            c1 = cl.coordinator("c1")
            port = free_port(socket.SOCK_STREAM, c1.ip)
            c1.data["gateway"] = {"listen": f"{c1.ip}:{port}"}
            c1.write_config()
            cl.start(c1)
            cl.wait_ready(c1)
            w1 = cl.worker("w1", [c1.dht_addr], services=["svc"], extra={
                "gateway": {"upstreams": {"svc": up.url}}, "worker": {"max_concurrency": 1}})
            w1.data["worker"]["endpoint"] = w1.gateway_url
            cl.start(w1)
            cl.wait_ready(w1)
            wait_until(lambda: "w1" in c1.providers("svc")[0], 30, "w1 announced")
            yield Net(c1, w1, up)
    finally:
        up.stop()


def _load(headers: Any) -> Load:
    load = parse_load(headers.get("RMA-Load"))
    assert load is not None, dict(headers)
    return load


async def _wait_holding(up: Upstream, n: int) -> None:
    await wait_for_async(lambda: up.holding == n, what=f"the upstream holding {n} requests")


async def test_every_gateway_answer_carries_the_load(net: Net) -> None:
    gw = net.w1.gateway_url
    net.up.release.clear()
    async with aiohttp.ClientSession() as s:
        async with s.get(gw + "/svc/echo/x") as r:          # small answer, after the work
            assert r.status == 200
            assert _load(r.headers) == Load(0, 0, 1)
        async with s.get(gw + "/nothing/here") as r:         # the gateway's own 404
            assert r.status == 404
            assert _load(r.headers) == Load(0, 0, 1)
        held = await s.get(gw + "/svc/hold")                 # streamed: headers sent mid-work
        try:
            assert held.status == 200
            assert _load(held.headers) == Load(1, 0, 1)
            await _wait_holding(net.up, 1)
            async with s.get(gw + "/svc/echo/y") as r:       # full: the gateway's 503
                assert r.status == 503 and r.headers["RMA-Not-Processed"] == "1"
                assert _load(r.headers) == Load(1, 0, 1)
            async with s.get(gw + PROOF_PATH, params={"nonce": new_nonce()}) as r:
                assert r.status == 200
                assert _load(r.headers) == Load(1, 0, 1)
        finally:
            net.up.release.set()
            assert (await held.read()).endswith(b"held")
            held.close()
            net.up.release.clear()


def _router_view(c1: Node, wid: str) -> dict[str, Any] | None:
    status, stats = c1.get("/api/dht/stats")
    assert status == 200
    return stats["router_detail"]["loads"]["workers"].get(wid)


async def test_the_callers_router_takes_the_load_from_each_answer(net: Net) -> None:
    c1, gw = net.c1, net.w1.gateway_url
    wid = await asyncio.to_thread(net.w1.node_id)
    route = c1.url + "/route/svc/echo/z"
    net.up.release.clear()
    async with aiohttp.ClientSession() as s:
        async with s.get(route) as r:
            assert r.status == 200 and r.headers["RMA-Worker"] == wid
        view = await asyncio.to_thread(_router_view, c1, wid)
        assert view is not None and view["source"] == "header"
        assert (view["inflight"], view["queue"], view["capacity"]) == (0, 0, 1)
        held = await s.get(gw + "/svc/hold")                 # w1 is now full
        try:
            await _wait_holding(net.up, 1)
            async with s.get(route) as r:                    # the router hears "full"
                assert r.status == 503
            view = await asyncio.to_thread(_router_view, c1, wid)
            assert view is not None and view["source"] == "header"
            assert (view["inflight"], view["capacity"]) == (1, 1)
        finally:
            net.up.release.set()
            await held.read()
            held.close()
            net.up.release.clear()
        # free again: the router honours the worker's Retry-After (answering 503 itself,
        # with the wait left) and then sends again and hears the new load
        async with asyncio.timeout(15):
            while True:
                async with s.get(route) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503 and "Retry-After" in r.headers, r.headers
                    wait = float(r.headers["Retry-After"])
                await asyncio.sleep(min(max(wait, 0.05), 1.0))      # as the header asks
        view = await asyncio.to_thread(_router_view, c1, wid)
        assert view is not None and (view["inflight"], view["capacity"]) == (0, 1)
        _, stats = await asyncio.to_thread(c1.get, "/api/dht/stats")
        counts = stats["router_detail"]["loads"]
        assert counts["headers"] >= 3 and counts["malformed"] == 0
