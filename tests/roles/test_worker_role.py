"""WorkerRole in process: announce, refresh, endpoint from the tunnel, fallback, withdraw."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.httpapi import json_errors
from agent.roles.coordinator import CoordinatorRole
from agent.roles.worker import WorkerRole
from tests.roles.fakes import FakeAgent, FakeDHT, make_config
from tests.util import wait_for_async as _until


def _worker(tmp_path, stores_on: int = 3, **sections: dict[str, Any]):
    dht = FakeDHT(Identity.generate(), stores_on=stores_on)
    agent = FakeAgent(make_config(tmp_path, "worker", **sections), dht)
    role = WorkerRole(agent)  # type: ignore[arg-type]
    agent.components.append(role)
    return agent, dht, role


async def test_announces_refreshes_and_withdraws(tmp_path) -> None:
    _agent, dht, role = _worker(tmp_path)
    await role.start()
    try:
        await _until(lambda: len(dht.announced) >= 1)
        first = dht.announced[0]
        first.verify()
        assert first.worker_id == dht.identity.node_id and not first.withdrawn
        assert first.services == ("ocr", "asr") and first.endpoint == "https://w.example.org"
        assert (first.gpu, first.gpu_memory_gb, first.capacity) == ("A100", 80.0, 4)
        assert first.region == "eu" and 19 <= first.expires_at - first.issued_at <= 21
        assert role.status() == "announced ocr,asr" and role.ready() == (True, "")
        # republish_interval = 1 s (±10 %): a refresh with a higher sequence follows
        await _until(lambda: len(dht.announced) >= 2)
        assert dht.announced[1].seq > first.seq
        assert role.stats()["worker"]["last_stored_on"] == 3
    finally:
        await role.stop()
    last = dht.announced[-1]
    assert last.withdrawn and last.seq > first.seq
    assert await dht.find_providers("ocr") == []
    assert role.status() == "withdrawn"


async def test_waits_for_tunnel_endpoint(tmp_path) -> None:
    # a 30 s refresh: everything below comes from the endpoint events, within the 10 s
    # limit of each wait, never from a periodic refresh
    agent, dht, role = _worker(tmp_path, worker={"endpoint": ""}, tunnel={"mode": "quick"},
                               dht={"republish_interval": 30, "record_ttl": 60})
    await role.start()
    try:
        # the announce loop ran and found no endpoint (its verdict, not a pause)
        await _until(lambda: role.stats()["worker"]["last_result"] == "no endpoint",
                     what="the announce loop's 'no endpoint' verdict")
        assert dht.announced == []
        ok, why = role.ready()
        assert not ok and "tunnel" in why
        assert role.status() == "no endpoint"
        agent.emit("endpoint", "https://abc.trycloudflare.com")
        await _until(lambda: len(dht.announced) == 1)   # at once, not at refresh
        assert dht.announced[0].endpoint == "https://abc.trycloudflare.com"
        assert role.ready() == (True, "")
        agent.emit("endpoint", "https://xyz.trycloudflare.com")        # the URL changed
        await _until(lambda: dht.announced[-1].endpoint == "https://xyz.trycloudflare.com")
        n = len(dht.announced)
        agent.emit("endpoint", "")                                      # tunnel gone
        await _until(lambda: len(dht.announced) == n + 1)
        tomb = dht.announced[-1]
        assert tomb.withdrawn and tomb.endpoint == "https://xyz.trycloudflare.com"
        assert await dht.find_providers("ocr") == []
        assert not role.ready()[0]
        agent.emit("endpoint", "https://new.trycloudflare.com")        # back again
        await _until(lambda: not dht.announced[-1].withdrawn)
        assert len(await dht.find_providers("ocr")) == 1
    finally:
        await role.stop()


async def test_no_endpoint_and_tunnel_off_says_what_to_do(tmp_path) -> None:
    _agent, _dht, role = _worker(tmp_path, worker={"endpoint": ""})
    ok, why = role.ready()
    assert not ok and "worker.endpoint" in why


async def test_load_change_reannounces(tmp_path) -> None:
    _agent, dht, role = _worker(tmp_path, dht={"republish_interval": 30, "record_ttl": 60})
    await role.start()
    try:
        await _until(lambda: len(dht.announced) == 1)
        role.set_inflight(3)
        await _until(lambda: len(dht.announced) == 2)
        assert dht.announced[-1].load == 3.0
        role.set_inflight(3.2)        # small jitter is not worth a re-announce:
        assert role.stats()["worker"]["load"] == 3.0    # the announced load is kept
        role.set_inflight(99)         # clamped to capacity
        await _until(lambda: len(dht.announced) == 3)
        # no record ever carried the jitter
        assert [r.load for r in dht.announced] == [0.0, 3.0, 4.0]
    finally:
        await role.stop()


async def test_reload_withdraws_removed_service(tmp_path) -> None:
    agent, dht, role = _worker(tmp_path, dht={"republish_interval": 30, "record_ttl": 60})
    await role.start()
    try:
        await _until(lambda: len(dht.announced) == 1)
        old = agent.config
        agent.config = dataclasses.replace(
            old, worker=dataclasses.replace(old.worker, services=("ocr",)))
        await role.reload(old, agent.config)
        await _until(lambda: len(dht.announced) == 3)
        tomb, live = dht.announced[1], dht.announced[2]
        assert tomb.withdrawn and tomb.services == ("asr",)
        assert not live.withdrawn and live.services == ("ocr",) and live.seq > tomb.seq
    finally:
        await role.stop()


async def test_service_with_upstream_down_is_withdrawn_then_back(tmp_path) -> None:
    """``set_down`` (the gateway's health checks): a tombstone for the service that is
    down, a record without it, and the full record again once it is back."""
    _agent, dht, role = _worker(tmp_path, dht={"republish_interval": 30, "record_ttl": 60})
    await role.start()
    try:
        await _until(lambda: len(dht.announced) == 1)
        role.set_down(frozenset({"asr"}))
        await _until(lambda: len(dht.announced) == 3)
        tomb, live = dht.announced[1], dht.announced[2]
        assert tomb.withdrawn and tomb.services == ("asr",)
        assert not live.withdrawn and live.services == ("ocr",) and live.seq > tomb.seq
        assert role.services() == ("ocr",)
        role.set_down(frozenset({"asr"}))                       # no change: no announce
        role.set_down(frozenset({"asr", "ocr"}))                # everything down
        await _until(lambda: dht.announced[-1].withdrawn)
        # the repeated report announced nothing: next came the withdrawal of ocr
        assert len(dht.announced) == 4 and dht.announced[3].services == ("ocr",)
        assert role.status() == "withdrawn" and role.services() == ()
        n = len(dht.announced)
        role.set_down(frozenset())                              # both back
        await _until(lambda: len(dht.announced) > n and not dht.announced[-1].withdrawn)
        assert dht.announced[-1].services == ("ocr", "asr")
        # nothing withdrawn on the way back: the pending withdrawal was dropped
        assert all(not r.withdrawn for r in dht.announced[n:])
    finally:
        await role.stop()


async def test_fallback_to_coordinator_registry(tmp_path) -> None:
    # a real CoordinatorRole behind a real HTTP server
    cdht = FakeDHT(Identity.generate(), stores_on=2)
    cagent = FakeAgent(make_config(tmp_path / "c", "coordinator"), cdht)
    coord = CoordinatorRole(cagent)  # type: ignore[arg-type]
    cagent.components.append(coord)
    app = web.Application(middlewares=[json_errors])
    coord.add_routes(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    base = f"http://127.0.0.1:{client.port}"
    # the worker's own DHT stores nowhere (UDP blocked)
    agent, dht, role = _worker(tmp_path / "w", stores_on=0,
                               discovery={"coordinators": (base, "http://127.0.0.1:1")})
    await role.start()
    try:
        # the registry holds it before the worker has read the coordinator's answer: wait
        # for both (checking the worker's count right after the first raced)
        await _until(lambda: len(coord.registry) == 1
                     and role.stats()["worker"]["fallback_registrations"]["ok"] >= 1)
        got = next(iter(coord.registry.values()))
        assert got.worker_id == dht.identity.node_id and got.services == ("ocr", "asr")
        assert cdht.announced and cdht.announced[0].encode() == got.encode()  # republished
        st = role.stats()["worker"]
        assert st["fallback_used"] and st["fallback_registrations"]["ok"] >= 1
        assert st["fallback_registrations"]["failed"] >= 1       # the dead coordinator
        assert role.status() == "announced ocr,asr"
        body = await (await client.get("/api/registry/ocr")).json()
        assert len(body["records"]) == 1
        WorkerRecord.decode(base64.b64decode(body["records"][0])).verify()
        wtext = generate_latest(agent.registry).decode()
        assert 'rma_agent_worker_announces_total{result="coordinator"}' in wtext
        ctext = generate_latest(cagent.registry).decode()
        assert "rma_agent_coordinator_registry_workers 1.0" in ctext
        assert 'rma_agent_coordinator_registrations_total{result="stored"}' in ctext
    finally:
        await role.stop()
    # the tombstone reached the coordinator too: the worker is gone from its registry
    body = await (await client.get("/api/registry/ocr")).json()
    assert body["records"] == []
    await client.close()


async def test_worker_answers_404_json_on_register(tmp_path) -> None:
    _agent, _dht, role = _worker(tmp_path)
    app = web.Application(middlewares=[json_errors])
    role.add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.post("/api/services/register", json={"record": "x"})
        assert resp.status == 404 and "coordinator" in (await resp.json())["error"]


async def test_unannounceable_config_is_not_ready(tmp_path) -> None:
    long_url = "https://" + "x" * 240 + ".example.org"     # valid config, too big a record
    _agent, dht, role = _worker(tmp_path, worker={"endpoint": long_url})
    await role.start()
    try:
        await _until(lambda: role.stats()["worker"]["last_result"].startswith("cannot build"))
        ok, why = role.ready()
        assert not ok and "cannot announce" in why
        assert dht.announced == []
    finally:
        await role.stop()


async def test_local_service_sets_the_load_over_http(tmp_path) -> None:
    _agent, dht, role = _worker(tmp_path, dht={"republish_interval": 30, "record_ttl": 60})
    app = web.Application(middlewares=[json_errors])
    role.add_routes(app)
    await role.start()
    try:
        await _until(lambda: len(dht.announced) == 1)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.put("/api/worker/load", json={"inflight": 3})
            assert resp.status == 200 and (await resp.json())["load"] == 3.0
            await _until(lambda: len(dht.announced) == 2)
            assert dht.announced[-1].load == 3.0
            # relayed through the tunnel (cloudflared adds Cf-Connecting-Ip): refused
            resp = await client.put("/api/worker/load", json={"inflight": 0},
                                    headers={"Cf-Connecting-Ip": "198.51.100.9"})
            assert resp.status == 403 and "error" in await resp.json()
            for bad in ({"inflight": -1}, {"inflight": "3"}, {"inflight": True}, [], {}):
                resp = await client.put("/api/worker/load", json=bad)
                assert resp.status == 400 and "error" in await resp.json(), bad
            resp = await client.put("/api/worker/load", data=b"not json")
            assert resp.status == 400
            resp = await client.put("/api/worker/load", json={"inflight": None})
            assert resp.status == 200 and (await resp.json())["inflight"] is None
            await _until(lambda: dht.announced[-1].load == 0.0)
    finally:
        await role.stop()


async def test_the_gateways_count_does_not_erase_the_services_reported_load(tmp_path) -> None:
    """Two reporters of the load meet in the worker: the local service (``PUT
    /api/worker/load``) and the gateway (its proxied requests). The gateway's count fell to
    0 after each burst and replaced what the service had reported (the demo's loads went
    to 0 after its first routed burst): the record carries the larger of the two."""
    _agent, dht, role = _worker(tmp_path, dht={"republish_interval": 30, "record_ttl": 60})
    app = web.Application(middlewares=[json_errors])
    role.add_routes(app)
    await role.start()
    try:
        await _until(lambda: len(dht.announced) == 1)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.put("/api/worker/load", json={"inflight": 3})
            assert resp.status == 200
            await _until(lambda: dht.announced[-1].load == 3.0)
            role.set_inflight(1)             # the gateway: one request in flight, then none
            role.set_inflight(0)
            assert role._current_load() == 3.0 and role.stats()["worker"]["load"] == 3.0
            role.set_inflight(4)             # the gateway sees more than the service said
            await _until(lambda: dht.announced[-1].load == 4.0)
            # the gateway's 1 and 0 never reached a record
            assert [r.load for r in dht.announced] == [0.0, 3.0, 4.0]
            resp = await client.put("/api/worker/load", json={"inflight": None})
            assert (await resp.json())["load"] == 4.0
    finally:
        await role.stop()
