"""HTTP-triggered DHT crawls are coalesced per service and rate-limited (429 JSON), so one
client looping over random names or ``Cache-Control: no-cache`` cannot make a flood."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp.test_utils import TestClient, TestServer

from agent.dht.api import add_routes as add_dht_routes
from agent.httpapi import make_app
from tests.discovery._support import make_discovery, make_record


async def _client(delay: float = 0.05):
    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    dht.delay = delay
    dht.add(make_record(name="w"))
    app = make_app(agent)
    add_dht_routes(app, dht)          # the stub stands for the DHT component's routes
    client = TestClient(TestServer(app))
    await client.start_server()
    return client, comp, dht


async def test_a_concurrent_flood_of_random_names_gets_429s() -> None:
    client, _comp, dht = await _client()
    try:
        answers = await asyncio.gather(*(client.get(f"/api/dht/providers/r{i}")
                                         for i in range(150)))
        statuses = [r.status for r in answers]
        assert statuses.count(429) >= 100 and statuses.count(200) >= 40, statuses
        assert len(dht.calls) == statuses.count(200)
    finally:
        await client.close()


async def test_concurrent_provider_crawls_of_one_service_share_one() -> None:
    client, comp, dht = await _client()
    try:
        answers = await asyncio.gather(*(client.get("/api/dht/providers/ocr")
                                         for _ in range(30)))
        assert {r.status for r in answers} == {200}
        assert dht.calls.count("ocr") == 1
        assert comp.crawl_limit.limited == 0
    finally:
        await client.close()


async def test_random_names_and_no_cache_are_limited_with_429() -> None:
    client, comp, dht = await _client(delay=0.0)
    try:
        statuses = []
        for _ in range(120):
            r = await client.get(f"/api/services/x{uuid.uuid4().hex[:12]}")
            statuses.append(r.status)
            if r.status == 429:
                body = await r.json()
                assert "error" in body and r.headers["Retry-After"]
        assert statuses.count(429) >= 50, statuses.count(429)
        # crawls made: the burst plus the rate over the loop's duration, not one per request
        assert len(dht.calls) <= 120 - statuses.count(429) + 1
        for _ in range(60):
            r = await client.get("/api/dht/providers/ocr",
                                 headers={"Cache-Control": "no-cache"})
            statuses.append(r.status)
        assert 429 in statuses[120:]
        # out of tokens: an uncached lookup is refused, a cached one never is
        comp.crawl_limit.bucket.tokens = 0
        r = await client.get("/api/services/ocr")
        assert r.status == 429
        await comp.lookup("ocr")                    # now cached
        comp.crawl_limit.bucket.tokens = 0
        r = await client.get("/api/services/ocr")
        assert r.status == 200 and (await r.json())["source"] == "cache"
    finally:
        await client.close()


async def test_explain_and_the_service_list_are_no_crawl_loops() -> None:
    """``?explain=1`` crawls the DHT afresh on every call (the records the cached answer
    lacks), and ``/api/services`` reads every index shard: both passed the crawl limiter
    for free once the service was cached, so a client looping on them made one crawl (or
    32) per request. Explain now takes a token; the service list is shared and reused."""
    client, comp, dht = await _client(delay=0.0)
    index_reads = 0

    async def service_counts() -> dict[str, int]:
        nonlocal index_reads
        index_reads += 1
        await asyncio.sleep(0.01)
        return {"ocr": 1}

    dht.service_counts = service_counts            # the DHT component's index read
    try:
        await comp.lookup("ocr")                    # cached from here on
        before = len(dht.calls)
        statuses = []
        for _ in range(120):
            r = await client.get("/api/services/ocr", params={"explain": "1"})
            statuses.append(r.status)
        assert statuses.count(429) >= 50, statuses.count(429)
        assert len(dht.calls) - before <= 120 - statuses.count(429)
        r = await client.get("/api/services/ocr")   # a plain cached lookup: never refused
        assert r.status == 200
        answers = await asyncio.gather(*(client.get("/api/services") for _ in range(50)))
        for _ in range(50):
            answers.append(await client.get("/api/services"))
        assert {a.status for a in answers} == {200}
        assert index_reads <= 2, index_reads
        assert (await answers[-1].json())["services"] == [{"name": "ocr", "workers": 1}]
    finally:
        await client.close()
