"""The router in one process against real HTTP stand-ins of worker gateways: forwarding,
headers, bodies, retries, ownership proofs, the endpoint rule, errors as JSON."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from agent.dht.identity import Identity
from tests.discovery._support import make_record
from tests.router._support import RouterAgent, StandInGateway
from tests.util import wait_for_async


async def test_forwards_method_path_query_and_body_with_worker_headers():
    gw = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(gw)
            c = ra.client
            for method in ("GET", "POST", "PUT", "DELETE"):
                data = os.urandom(5000) if method in ("POST", "PUT") else None
                r = await c.request(method, "/route/OCR/v1/a%20b/c?x=1&y=a%26b%20c", data=data,
                                    headers={"X-Custom": "yes", "Connection": "close, X-Drop",
                                             "X-Drop": "secret", "RMA-Region": "eu-west",
                                             "Keep-Alive": "timeout=5"})
                assert r.status == 200, await r.text()
                body = await r.json()
                assert body["method"] == method
                assert body["path"] == "/ocr/v1/a b/c"
                assert body["query"] == "x=1&y=a%26b%20c"
                assert body["size"] == (len(data) if data else 0)
                if data:
                    assert body["sha256"] == hashlib.sha256(data).hexdigest()
                hdrs = body["headers"]
                assert hdrs["x-custom"] == "yes"
                for hop in ("x-drop", "keep-alive", "rma-region"):
                    assert hop not in hdrs, hop
                assert r.headers["RMA-Worker"] == gw.identity.node_id.hex()
                assert r.headers["RMA-Attempts"] == "1"
            # one proof for the endpoint, then it is remembered
            assert gw.proofs == 1
            stats = ra.agent.stats()
            assert stats["router"] == {"requests": 4, "ok": 4, "failed": 0, "retries": 0,
                                       "attempts": 4}
    finally:
        await gw.stop()


async def test_full_worker_is_skipped_and_request_lands_on_another():
    full = await StandInGateway(mode="full").start()
    good = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            # the full worker ranks first (more free capacity announced)
            ra.announce(full, load=0.0, capacity=8)
            ra.announce(good, load=3.0, capacity=4)
            ra.disc.rng.seed(0)
            served = set()
            for _ in range(6):
                r = await ra.client.post("/route/ocr/x", data=b"payload")
                assert r.status == 200, await r.text()
                served.add(r.headers["RMA-Worker"])
            assert served == {good.identity.node_id.hex()}
            assert full.requests, "the full worker was never tried: the test proves nothing"
            assert ra.agent.stats()["router_detail"]["retries_by_reason"]["not_processed"] >= 1
    finally:
        await full.stop()
        await good.stop()


async def test_a_full_workers_refusal_is_retried_with_the_retry_budget_spent():
    """A refusal before any work (503 + RMA-Not-Processed) costs no retry budget: with the
    budget empty, the request still lands on the worker with a free slot — while a retry
    that could do the work twice (a 502 on a GET) is refused, so the budget is in force."""
    full = await StandInGateway(mode="full").start()
    good = await StandInGateway().start()
    failing = await StandInGateway(mode="fail").start()
    try:
        async with RouterAgent() as ra:
            ra.announce(full, load=0.0, capacity=8)    # ranks first: more free capacity
            ra.announce(good, load=3.0, capacity=4)
            ra.router.budget.tokens = 0.0
            r = await ra.client.post("/route/ocr/x", data=b"payload")
            assert r.status == 200, await r.text()
            assert r.headers["RMA-Worker"] == good.identity.node_id.hex()
            assert full.requests, "the full worker was never tried: the test proves nothing"
            assert ra.router.budget.refused == 0
        async with RouterAgent() as ra:
            ra.announce(failing, load=0.0, capacity=8)
            ra.announce(good, load=3.0, capacity=4)
            ra.router.budget.tokens = 0.0
            served_before = len(good.requests)
            r = await ra.client.get("/route/ocr/x")
            assert r.status == 502 and failing.requests
            assert len(good.requests) == served_before          # not tried again there
            assert ra.router.budget.refused == 1
    finally:
        for gw in (full, good, failing):
            await gw.stop()


async def test_impostor_endpoint_is_never_routed_to_and_not_offered():
    honest = await StandInGateway().start()
    impostor_id = Identity.generate()
    try:
        async with RouterAgent() as ra:
            # the impostor announces the honest worker's endpoint with its own key
            ra.announce(honest, load=3.0, capacity=4)
            ra.dht.add(make_record(
                impostor_id, endpoint=honest.endpoint, services=("ocr",), load=0.0,
                capacity=8, name="impostor"))
            for _ in range(10):
                r = await ra.client.get("/route/ocr/ping")
                assert r.status == 200
                assert r.headers["RMA-Worker"] == honest.identity.node_id.hex()
            r = await ra.client.get("/api/services/ocr")
            names = [w["name"] for w in (await r.json())["workers"]]
            assert "impostor" not in names and names
            st = ra.disc.tracker.get(impostor_id.node_id)
            assert st is not None and st.proof == "failed"
            assert ra.disc.ownership.counts["bad"] == 1
            assert ra.agent.stats()["discovery"]["proof_failed_workers"] == 1
    finally:
        await honest.stop()


async def test_forbidden_endpoint_not_offered_and_never_contacted():
    good = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(good, load=3.0, capacity=4)
            ra.dht.add(make_record(
                Identity.generate(), endpoint="http://10.0.0.1/", services=("ocr",),
                load=0.0, capacity=8, name="lan"))
            for _ in range(5):
                r = await ra.client.get("/route/ocr/ping")
                assert r.status == 200
            r = await ra.client.get("/api/services/ocr")
            assert [w["name"] for w in (await r.json())["workers"]] == ["w"]
            assert "10.0.0.1" not in ra.disc.contacts
            assert "127.0.0.1" in ra.disc.contacts     # the hook does count what is contacted
    finally:
        await good.stop()


async def test_errors_are_json():
    async with RouterAgent() as ra:
        c = ra.client
        r = await c.get("/route/nobody/x")
        assert r.status == 404 and "no workers" in (await r.json())["error"]
        r = await c.get("/route/bad!name/x")
        assert r.status == 400 and "error" in await r.json()
        r = await c.get("/route/ocr/x", headers={"RMA-Min-GPU-Memory-GB": "lots"})
        assert r.status == 400 and "RMA-Min-GPU-Memory-GB" in (await r.json())["error"]
        # sent raw: aiohttp's client would normalise the dot segments away itself
        reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
        writer.write(b"GET /route/ocr/a/%2e%2E/admin HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"error"' in answer
        # a worker that is down: 502 after trying it
        ra.dht.add(make_record(
            Identity.generate(), endpoint="http://127.0.0.1:9", services=("ocr",)))
        r = await c.get("/route/ocr/x")
        assert r.status == 502, await r.text()
        body = await r.json()
        assert "no worker could serve" in body["error"] and body["attempts"] == 1


async def test_redirects_relayed_not_followed_204_and_head():
    gw = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(gw)
            c = ra.client
            r = await c.get("/route/ocr/x/redirect", allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "http://10.0.0.1/steal"
            assert r.headers["RMA-Worker"] == gw.identity.node_id.hex()
            assert "10.0.0.1" not in ra.disc.contacts
            r = await c.delete("/route/ocr/x/empty")
            assert r.status == 204 and await r.read() == b""
            r = await c.head("/route/ocr/x/echo")
            assert r.status == 200 and r.headers["RMA-Attempts"] == "1"
            assert int(r.headers["Content-Length"]) > 0 and await r.read() == b""
    finally:
        await gw.stop()


async def test_a_caller_that_hangs_up_mid_upload_does_not_demote_the_worker():
    gw = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(gw)
            assert (await ra.client.get("/route/ocr/warm")).status == 200
            _reader, writer = await asyncio.open_connection("127.0.0.1", ra.client.port)
            writer.write(b"POST /route/ocr/upload HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 20000000\r\n\r\n" + b"\0" * (3 << 20))
            await writer.drain()
            await wait_for_async(lambda: "/ocr/upload" in gw.arrived,
                                 what="the upload being forwarded to the worker")
            writer.close()
            await wait_for_async(lambda: ra.router.counts["outcome_aborted"],
                                 what="the attempt counted aborted")
            assert ra.router.counts["outcome_aborted"] == 1
            assert not ra.disc.tracker.is_banned(gw.identity.node_id, time.time())
            assert (await ra.client.get("/route/ocr/after")).status == 200
    finally:
        await gw.stop()


async def test_filter_headers_pick_the_workers():
    big = await StandInGateway().start()
    small = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(big, gpu="A100", gpu_memory_gb=80.0, region="us-east")
            ra.announce(small, gpu="T4", gpu_memory_gb=16.0, region="eu-west")
            c = ra.client
            for headers, want in (({"RMA-GPU": "t4"}, small), ({"RMA-Region": "US-East"}, big),
                                  ({"RMA-Min-GPU-Memory-GB": "40"}, big)):
                for _ in range(5):
                    r = await c.get("/route/ocr/x", headers=headers)
                    assert r.status == 200, await r.text()
                    assert r.headers["RMA-Worker"] == want.identity.node_id.hex(), headers
            r = await c.get("/route/ocr/x", headers={"RMA-GPU": "H100"})
            assert r.status == 404 and "no workers" in (await r.json())["error"]
            metrics = await (await c.get("/metrics")).text()
            for name in ('rma_agent_routed_requests_total{outcome="ok"} 15.0',
                         'rma_agent_routed_requests_total{outcome="no_workers"} 1.0',
                         "rma_agent_route_attempts_bucket", "rma_agent_route_upstream_seconds",
                         'rma_agent_route_lookups_total{source="dht"}',
                         "rma_agent_route_dht_hit_ratio", "rma_agent_route_fallback_ratio",
                         'rma_agent_endpoint_proofs_total{outcome="ok"} 2.0'):
                assert name in metrics, name
    finally:
        await big.stop()
        await small.stop()


async def test_large_streamed_body_is_retried_when_none_of_it_was_sent():
    good = await StandInGateway().start()
    gone = await StandInGateway().start()
    body = os.urandom(3 << 20)            # above the 1 MiB replay buffer: streamed
    try:
        async with RouterAgent() as ra:
            ra.announce(good, load=3.0, capacity=4)
            ra.announce(gone, load=0.0, capacity=8)
            for _ in range(40):                     # until both are proven and remembered
                if gone.proofs and good.proofs:
                    break
                assert (await ra.client.get("/route/ocr/warm")).status == 200
            assert gone.proofs and good.proofs
            await gone.stop()                                  # now it refuses connections
            for _ in range(30):             # until the draw puts the gone worker first
                r = await ra.client.post("/route/ocr/up", data=body)
                assert r.status == 200, await r.text()
                answer = await r.json()
                assert answer["sha256"] == hashlib.sha256(body).hexdigest()
                assert r.headers["RMA-Worker"] == good.identity.node_id.hex()
                if r.headers["RMA-Attempts"] == "2":
                    break
            else:
                raise AssertionError("the gone worker was never drawn first")
            assert ra.router.counts["retry_connect"] == 1
            assert ra.disc.tracker.is_banned(gone.identity.node_id, time.time())
    finally:
        await good.stop()


async def test_routes_from_the_last_known_good_copy_when_the_dht_is_gone():
    """Discovery answers from its on-disk copy with source "stale" (scale) when neither
    the DHT nor a coordinator answers; the router counted lookups per source with a fixed
    list without "stale" and answered that request with a 500 (KeyError)."""
    gw = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.announce(gw)
            r = await ra.client.get("/route/ocr/v1/x")
            assert r.status == 200
            state_dir = ra.agent.config.agent.state_dir
        async with RouterAgent(state_dir=state_dir) as ra2:     # restarted, DHT cut off
            ra2.dht.fail = True
            r = await ra2.client.get("/route/ocr/v1/x")
            assert r.status == 200, await r.text()
            assert r.headers["RMA-Worker"] == gw.identity.node_id.hex()
            detail = ra2.agent.stats()["router_detail"]
            assert detail["lookups_by_source"]["stale"] == 1
    finally:
        await gw.stop()
