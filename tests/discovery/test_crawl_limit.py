"""HTTP-triggered DHT crawls are coalesced per service and rate-limited (429 JSON), so one
client looping over random names or ``Cache-Control: no-cache`` cannot make a flood."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp.test_utils import TestClient, TestServer

from agent.dht.api import add_routes as add_dht_routes
from agent.discovery.crawl_limit import CRAWL_BURST, CRAWL_RATE
from agent.httpapi import make_app
from tests.discovery._support import make_discovery, make_record
from tests.util import ClockedBucket, ManualClock


async def _client(delay: float = 0.05):
    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    dht.delay = delay
    dht.add(make_record(name="w"))
    limit = comp.crawl_limit
    clock = ManualClock()        # tokens come back only when the test says (tests.util)
    limit.bucket = ClockedBucket(limit.bucket.rate, limit.bucket.burst, clock)
    app = make_app(agent)
    add_dht_routes(app, dht)          # the stub stands for the DHT component's routes
    client = TestClient(TestServer(app))
    await client.start_server()
    client.clock = clock              # type: ignore[attr-defined]
    return client, comp, dht


async def test_a_concurrent_flood_of_random_names_gets_429s() -> None:
    client, comp, dht = await _client()
    try:
        answers = await asyncio.gather(*(client.get(f"/api/dht/providers/r{i}")
                                         for i in range(150)))
        statuses = [r.status for r in answers]
        # the banked burst, then 429s: one crawl per 200, none per 429
        assert statuses.count(200) == CRAWL_BURST and statuses.count(429) == 150 - CRAWL_BURST
        assert len(dht.calls) == CRAWL_BURST and comp.crawl_limit.limited == 150 - CRAWL_BURST
        client.clock.advance(1.0)    # one second: CRAWL_RATE tokens come back
        answers = await asyncio.gather(*(client.get(f"/api/dht/providers/s{i}")
                                         for i in range(50)))
        assert [r.status for r in answers].count(200) == CRAWL_RATE
        assert len(dht.calls) == CRAWL_BURST + CRAWL_RATE
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
        # crawls made: the burst, not one per request (the clock stands still)
        assert statuses.count(200) == CRAWL_BURST, statuses.count(200)
        assert statuses.count(429) == 120 - CRAWL_BURST
        assert len(dht.calls) == CRAWL_BURST
        for _ in range(60):
            r = await client.get("/api/dht/providers/ocr",
                                 headers={"Cache-Control": "no-cache"})
            statuses.append(r.status)
        assert set(statuses[120:]) == {429}          # no token left: no-cache is refused
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
        assert statuses.count(200) == CRAWL_BURST, statuses.count(200)
        assert statuses.count(429) == 120 - CRAWL_BURST
        assert len(dht.calls) - before == CRAWL_BURST     # one crawl per explained answer
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
