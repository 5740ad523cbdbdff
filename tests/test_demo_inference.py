"""The emulated inference server (agent/cli/demo_inference.py) behaves like a GPU server.

Why: bench/balance.py and the routing tests judge routing against it, so its slots,
queue, refusals, streams, cancellation, load signals and log must be what they claim.
Everything runs in-process on loopback; waits are on the server's own state.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
from typing import Any

import aiohttp
import pytest

from agent.cli.demo_inference import (
    BUSY_ERROR,
    SERVICE_MS_HEADER,
    Entry,
    InferenceFarm,
    InferenceServer,
    Profile,
    SlotPool,
    entries_from_json,
    sent_to_full,
)
from tests.util import wait_for, wait_for_async

HOLD = {SERVICE_MS_HEADER: "100000"}     # a request that holds its slot until cancelled


async def _server(**kw: Any) -> InferenceServer:
    server = InferenceServer(Profile(**kw))
    await server.start()
    return server


def _requests(server: InferenceServer) -> list[Entry]:
    return [e for e in server.log if e.kind == "request"]


def _gauges(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(3)) for m in
            re.finditer(r"^((?:vllm|llamacpp):[a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M)}


async def test_slots_then_fifo_queue_then_503() -> None:
    server = await _server(slots=2, queue_limit=2)
    try:
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(s.post(server.url + "/v1/x", headers=HOLD))
                    for _ in range(2)]
            await wait_for_async(lambda: server.running == 2, what="2 in service")
            quick = {SERVICE_MS_HEADER: "1"}
            queued = []
            for _ in range(2):   # one at a time, so their arrival order is known
                queued.append(asyncio.create_task(s.post(server.url + "/v1/y",
                                                         headers=quick)))
                n = len(queued)
                await wait_for_async(lambda n=n: server.pool.waiting == n, what="queued")
            metrics = _gauges(await (await s.get(server.url + "/metrics")).text())
            assert metrics == {"vllm:num_requests_running": 2.0,
                               "vllm:num_requests_waiting": 2.0,
                               "vllm:kv_cache_usage_perc": 1.0,
                               "llamacpp:requests_processing": 2.0,
                               "llamacpp:requests_deferred": 2.0,
                               "llamacpp:kv_cache_usage_ratio": 1.0}
            slots = await (await s.get(server.url + "/slots")).json()
            assert [x["is_processing"] for x in slots] == [True, True]
            refused = await s.post(server.url + "/v1/z")
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            assert (await refused.json())["error"] == BUSY_ERROR
            for t in held:
                t.cancel()
            await wait_for_async(lambda: all(e.outcome != "pending"
                                             for e in _requests(server)), what="all done")
            answers = [await (await t).json() for t in queued]
    finally:
        await server.stop()
    entries = _requests(server)
    assert [e.outcome for e in entries] == ["cancelled", "cancelled", "ok", "ok", "rejected"]
    first, second = entries[2], entries[3]
    assert first.start <= second.start                      # FIFO
    assert all(a["queued_ms"] > 0 for a in answers)
    assert server.pool.used == 0 and server.running == 0


async def test_stream_arrives_chunk_by_chunk() -> None:
    server = await _server(tokens=4)
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(server.url + "/v1/chat/completions", json={"stream": True},
                                headers={SERVICE_MS_HEADER: "400"})
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await resp.content.readuntil(b"\n\n")
            # the first token is here while the server is still producing the answer
            assert _requests(server)[0].outcome == "pending"
            assert b'"token": 0' in first
            rest = (await resp.content.read()).split(b"\n\n")
    finally:
        await server.stop()
    tokens = [c for c in rest if c.startswith(b"data: {")]
    assert len(tokens) == 3 and rest[-2] == b"data: [DONE]"


async def test_hang_up_frees_the_slot() -> None:
    server = await _server(slots=1)
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.get(server.url + "/gen?stream=1", headers=HOLD)
            assert server.running == 1          # the stream's head is sent in service
            resp.close()                        # the caller hangs up mid-stream
            await wait_for_async(lambda: _requests(server)[0].outcome == "cancelled",
                                 what="the server saw the hang-up")
            assert server.pool.used == 0 and server.running == 0
            ok = await s.get(server.url + "/next", headers={SERVICE_MS_HEADER: "0"})
            assert ok.status == 200 and (await ok.json())["server"] == "gpu"
    finally:
        await server.stop()


async def test_loading_answers_503_until_loaded() -> None:
    server = await _server()
    try:
        server.set_loading(True)
        async with aiohttp.ClientSession() as s:
            loading = await s.get(server.url + "/health")
            assert loading.status == 503
            assert (await loading.json())["error"]["message"] == "Loading model"
            assert (await s.post(server.url + "/v1/x")).status == 503
            server.set_loading(False)
            assert (await s.get(server.url + "/health")).status == 200
            assert (await s.get(server.url + "/")).status == 404     # not a request
            r = await s.post(server.url + "/v1/x", headers={SERVICE_MS_HEADER: "0"})
            assert r.status == 200
            log = await (await s.get(server.url + "/emu/log")).json()
    finally:
        await server.stop()
    entries = entries_from_json(log["entries"])
    assert [e.outcome for e in entries] == ["loading", "ok"]
    assert math.isnan(entries[0].start) and entries[1].start >= entries[1].arrival


async def test_owner_takes_slots_ahead_of_the_queue() -> None:
    server = await _server(slots=1, owner_every_s=0.01, owner_hold_s=0.05)
    try:
        await wait_for_async(lambda: any(e.kind == "owner" and e.outcome == "ok"
                                         for e in server.log), what="an owner hold")
    finally:
        await server.stop()
    holds = [e for e in server.log if e.kind == "owner" and e.outcome == "ok"]
    assert all(e.end >= e.start >= e.arrival for e in holds)


def test_service_times_heavy_tailed_repeatable_and_scaled() -> None:
    def draw(speed: float) -> list[float]:
        server = InferenceServer(Profile(mean_ms=200, sigma=1.0, speed=speed, seed=7))
        return [server.service_s() for _ in range(20_000)]

    slow, fast = draw(1.0), draw(2.0)
    assert slow == draw(1.0)
    assert statistics.fmean(slow) == pytest.approx(0.2, rel=0.1)
    assert all(f == pytest.approx(s / 2) for s, f in zip(slow, fast, strict=True))
    assert max(slow) <= 20 * 0.2 + 1e-9
    q = statistics.quantiles(slow, n=100)
    assert q[98] > 5 * q[49]                       # p99 well above the median


async def test_pool_gives_back_a_slot_handed_to_a_cancelled_waiter() -> None:
    pool = SlotPool(1)
    await pool.take()
    waiter = asyncio.create_task(pool.take())
    await wait_for_async(lambda: pool.waiting == 1, what="waiting")
    pool.release()          # handed to the waiter ...
    waiter.cancel()         # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.used == 0 and pool.free


def test_sent_to_full_counts_only_waits_while_another_was_free() -> None:
    a = [Entry(1, "request", 0.0, 0.0, 10.0, "ok"),
         Entry(2, "request", 1.0, 10.0, 11.0, "ok"),     # waited; b was free at 1.0
         Entry(3, "request", 6.0, math.nan, 6.0, "rejected")]  # refused; b busy at 6.0
    b = [Entry(1, "request", 5.0, 5.0, 8.0, "ok"),
         Entry(2, "owner", 2.0, 2.0, 3.0, "ok")]
    assert sent_to_full({"a": (1, a), "b": (1, b)}) == (1, 4)
    assert sent_to_full({"a": (1, a), "b": (1, b)}, since=2.0) == (0, 2)


def test_farm_serves_from_a_thread() -> None:
    import urllib.request

    farm = InferenceFarm()
    try:
        url = farm.add(Profile(name="box-1", mean_ms=1))
        with urllib.request.urlopen(url + "/v1/x", timeout=5) as r:
            assert r.status == 200
        wait_for(lambda: farm.call(lambda: len(farm.servers[0].log)) == 1, what="logged")
    finally:
        farm.close()


def test_load_signals_read_by_the_gateways_own_parsers() -> None:
    """What the emulator publishes is what the gateway's vllm and llamacpp kinds read."""
    from agent.gateway.kinds import llamacpp, vllm

    server = InferenceServer(Profile(slots=3))
    server.pool.used, server.running = 2, 1        # one request and the owner's hold
    text = server.metrics_text().encode()
    v = vllm.parse_metrics(text)
    assert (v.running, v.waiting) == (1, 0) and v.kv_cache == pytest.approx(2 / 3)
    m = llamacpp.parse_metrics(text)
    assert (m.running, m.waiting) == (1, 0)
    slots = llamacpp.parse_slots(json.dumps(server.slots_json()).encode())
    assert (slots.slots, slots.running) == (3, 2)
