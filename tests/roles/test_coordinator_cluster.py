"""The coordinator's registry and the DHT it republishes into, with real agent processes
(issue 20, item 4): what a coordinator relays is bounded on the storing nodes that trust
it, and never outlives the registry.

Clients register from their own loopback source addresses (``127.1.k.1``: one /24 each),
so the coordinator sees real, distinct client IPs without any forwarding header.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import pytest

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from tests.cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.slow

TTL = 20          # the cluster's dht.record_ttl


def rec(name: str, endpoint: str, ttl: float = TTL) -> WorkerRecord:
    return WorkerRecord.create(Identity.generate(), name=name, services=("ocr",),
                               endpoint=endpoint, gpu="T4", gpu_memory_gb=16.0, load=0.0,
                               capacity=4, region="eu", ttl=ttl)


async def _register(node: Node, batches: dict[str, list[WorkerRecord]]) -> list[int]:
    """POST each batch from its source address; the statuses, in order. A registration
    refused by the rate limit (not by a quota) is sent again once the bucket refilled:
    the point here is what the quotas let through, not how fast."""
    statuses: list[int] = []
    for src, records in batches.items():
        conn = aiohttp.TCPConnector(local_addr=(src, 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            for r in records:
                body: dict[str, Any] = {"record": base64.b64encode(r.encode()).decode()}
                for _ in range(100):
                    async with s.post(node.url + "/api/services/register", json=body) as resp:
                        answer = await resp.json()
                        if resp.status == 429 and "too many registrations" in answer["error"]:
                            await asyncio.sleep(float(resp.headers["Retry-After"]) / 10)
                            continue
                        statuses.append(resp.status)
                        break
    return statuses


def _stored(node: Node) -> int:
    status, stats = node.get("/api/dht/stats")
    assert status == 200, stats
    return int(stats["records_stored"])


def test_relayed_records_are_bounded_and_never_outlive_the_registry(tmp_path) -> None:
    with Cluster(tmp_path, record_ttl=TTL, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        store = cl.coordinator("store", [c1.dht_addr])     # trusts c1: its configured seed
        cl.start(store)
        cl.wait_ready(store)
        wait_until(lambda: c1.get("/api/dht/stats")[1]["peers"] >= 1, 20, "c1 sees the peer")

        # a record claiming an hour is kept by the registry (capped) but not republished;
        # a record within the registry's keep is
        long_lived = rec("hour", "https://hour.example.org", ttl=3600)
        short = rec("short", "https://short.example.org")
        assert asyncio.run(_register(c1, {"127.1.200.1": [long_lived, short]})) == [200, 200]
        wait_until(lambda: "short" in store.providers("ocr")[0], 15, "the short record relayed")
        assert "hour" not in store.providers("ocr")[0]
        _, body = c1.get("/api/registry/ocr")
        assert len(body["records"]) == 2

        # 300 workers registered from 30 networks, all naming endpoints under one domain:
        # the registry takes them all (10 per /24), the storing node that trusts the
        # coordinator keeps what one domain may hold (256 entries: 128 records x 2 keys)
        batches = {f"127.1.{k}.1": [rec(f"f{k}-{i}", f"https://w{k}-{i}.flood.example")
                                    for i in range(10)] for k in range(30)}
        assert asyncio.run(_register(c1, batches)) == [200] * 300
        _, stats = c1.get("/api/dht/stats")
        assert stats["coordinator"]["registry_size"] == 302
        held = _stored(store)
        assert 256 <= held <= 256 + 2, held                 # + the short record's 2 keys
        _, stats = store.get("/api/dht/stats")
        assert stats["store_refused"].get("sender_full", 0) >= 300 * 2 - 256

        # one /24 cannot register past its quota either, whatever its IP count
        flood = {f"127.1.250.{n}": [rec(f"s{n}-{i}", f"https://s{n}-{i}.other.example")
                                    for i in range(45)] for n in range(1, 7)}
        statuses = asyncio.run(_register(c1, flood))
        assert statuses.count(200) == 256 and statuses.count(429) == 270 - 256
