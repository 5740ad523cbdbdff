"""The coordinator's registry under abuse: closed-network admission, per-IP rate limit and
quota, TTL cap, and no eviction of live records (issue 11)."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.admission.certificate import Certificate
from agent.admission.component import NetworkComponent
from agent.admission.keys import NetworkKey
from agent.admission.revocation import RevocationList
from agent.config.model import NetworkSection
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.httpapi import json_errors
from agent.netgroups import network_of
from agent.roles import registry as reg_mod
from agent.roles.coordinator import CoordinatorRole
from tests.roles.fakes import FakeAgent, FakeDHT, make_config
from tests.util import ClockedBucket, ManualClock

NK = NetworkKey.generate()


def rec(ident: Identity, *, cert: bytes = b"", services=("ocr",), ttl: float = 20,
        **kw: Any) -> WorkerRecord:
    return WorkerRecord.create(ident, name=kw.pop("name", "w"), services=services,
                               endpoint="https://w.example", gpu="T4", gpu_memory_gb=16.0,
                               load=0.0, capacity=4, region="eu", ttl=ttl, cert=cert, **kw)


def certified(ident: Identity, **kw: Any) -> WorkerRecord:
    c = Certificate.issue(NK, ident.public_key, services=("ocr",)).encode()
    return rec(ident, cert=c, **kw)


def b64(r: WorkerRecord) -> dict[str, str]:
    return {"record": base64.b64encode(r.encode()).decode()}


async def _serve(tmp_path, closed: bool) -> tuple[TestClient, CoordinatorRole, Any]:
    cfg = make_config(tmp_path, "coordinator")
    if closed:
        cfg = dataclasses.replace(cfg, network=NetworkSection(
            admission_keys=(base64.b64encode(NK.public_key).decode(),)))
    agent = FakeAgent(cfg, FakeDHT(Identity.generate()))
    network = NetworkComponent(agent)  # type: ignore[arg-type]
    role = CoordinatorRole(agent)  # type: ignore[arg-type]
    agent.components += [network, role]
    app = web.Application(middlewares=[json_errors])
    role.add_routes(app)
    network.add_routes(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client, role, network


@pytest.fixture
async def closed(tmp_path) -> AsyncIterator[tuple[TestClient, CoordinatorRole, Any]]:
    client, role, network = await _serve(tmp_path, closed=True)
    try:
        yield client, role, network
    finally:
        await network.stop()
        await client.close()


@pytest.fixture
async def open_(tmp_path) -> AsyncIterator[tuple[TestClient, CoordinatorRole, Any]]:
    client, role, network = await _serve(tmp_path, closed=False)
    try:
        yield client, role, network
    finally:
        await client.close()


async def test_closed_network_registers_only_admitted(closed) -> None:
    client, role, network = closed
    good, bare, other = Identity.generate(), Identity.generate(), Identity.generate()
    resp = await client.post("/api/services/register", json=b64(certified(good)))
    assert resp.status == 200, await resp.json()
    resp = await client.post("/api/services/register", json=b64(rec(bare)))
    body = await resp.json()
    assert resp.status == 403 and "no admission certificate" in body["error"]
    # a certificate copied from an admitted worker does not admit another key
    stolen = Certificate.issue(NK, good.public_key, services=("ocr",)).encode()
    resp = await client.post("/api/services/register", json=b64(rec(other, cert=stolen)))
    assert resp.status == 403 and "another key" in (await resp.json())["error"]
    # a certificate for ocr does not admit an asr announcement
    resp = await client.post("/api/services/register",
                             json=b64(certified(other, services=("ocr", "asr"))))
    assert resp.status == 403 and "cover" in (await resp.json())["error"]
    assert set(role.registry) == {good.node_id}
    # revocation removes it from the registry and its answers; re-registering is refused
    assert network._take(RevocationList.issue(NK, [good.public_key]), "test")
    network._apply()
    assert role.registry == {}
    resp = await client.get("/api/registry/ocr")
    assert (await resp.json())["records"] == []
    resp = await client.post("/api/services/register", json=b64(certified(good)))
    assert resp.status == 403 and "revoked" in (await resp.json())["error"]
    # the lists it knows are served to other agents
    resp = await client.get("/api/network/revocations")
    lists = (await resp.json())["lists"]
    assert len(lists) == 1
    assert RevocationList.decode(base64.b64decode(lists[0])).revoked == (good.public_key,)


async def test_admitted_worker_can_withdraw(closed) -> None:
    client, role, _ = closed
    w = Identity.generate()
    live = certified(w)
    assert (await client.post("/api/services/register", json=b64(live))).status == 200
    resp = await client.post("/api/services/register", json=b64(live.tombstone(w)))
    assert resp.status == 200, await resp.json()
    assert role.registry[w.node_id].withdrawn
    assert (await (await client.get("/api/registry/ocr")).json())["records"] == []


async def test_rate_limit_per_source_ip(open_, monkeypatch) -> None:
    client, _role, _ = open_
    # the buckets on a test clock: on the wall clock a loaded machine refilled them
    # during the loop and fewer than 15 429s came (tests.util.ClockedBucket)
    clock = ManualClock()
    monkeypatch.setattr(reg_mod, "TokenBucket", lambda r, b: ClockedBucket(r, b, clock))
    statuses = []
    w = Identity.generate()
    burst = int(reg_mod.REGISTER_BURST)
    for i in range(burst + 20):
        resp = await client.post("/api/services/register", json=b64(rec(w, name=f"n{i}")))
        statuses.append(resp.status)
        if resp.status == 429:
            assert resp.headers["Retry-After"] and "too many" in (await resp.json())["error"]
    assert statuses == [200] * burst + [429] * 20


async def test_quota_per_ip_and_no_eviction_when_full(open_, monkeypatch) -> None:
    client, role, _ = open_
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 3)
    ids = [Identity.generate() for _ in range(4)]
    for ident in ids[:3]:
        assert (await client.post("/api/services/register", json=b64(rec(ident)))).status == 200
    resp = await client.post("/api/services/register", json=b64(rec(ids[3], ttl=3600)))
    assert resp.status == 429 and "already registered" in (await resp.json())["error"]
    # a known worker may still refresh its record from that address
    assert (await client.post("/api/services/register", json=b64(rec(ids[0])))).status == 200
    # a full registry refuses a newcomer instead of evicting a live honest record, however
    # long-lived the newcomer claims to be
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 100)
    monkeypatch.setattr(reg_mod, "REGISTRY_MAX", 3)
    resp = await client.post("/api/services/register", json=b64(rec(ids[3], ttl=3600)))
    assert resp.status == 503 and "full" in (await resp.json())["error"]
    assert set(role.registry) == {i.node_id for i in ids[:3]}


async def test_claimed_lifetime_is_capped(open_) -> None:
    _client, role, _ = open_
    w = Identity.generate()
    r = rec(w, ttl=3600)
    now = time.time()
    assert role._store(r, "192.0.2.1", now) == "stored"
    ttl = role.agent.config.dht.record_ttl
    role._expire(now + ttl - 1)
    assert w.node_id in role.registry
    role._expire(now + ttl + 1)              # its own expiry is an hour away; gone anyway
    assert w.node_id not in role.registry and role.book.per_ip == {}


async def test_limits_follow_the_client_behind_a_named_proxy(open_, monkeypatch) -> None:
    """Through cloudflared/a TLS proxy every request comes from loopback: once the operator
    names that proxy (``http.trusted_proxies``) the limits apply to the client it names."""
    client, role, _ = open_
    cfg = role.agent.config
    role.agent.config = dataclasses.replace(cfg, http=dataclasses.replace(
        cfg.http, trusted_proxies=("127.0.0.1", "::1")))
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 2)
    for i in range(2):
        resp = await client.post("/api/services/register", json=b64(rec(Identity.generate())),
                                 headers={"X-Forwarded-For": f"203.0.113.9, 198.51.100.{i}"})
        assert resp.status == 200
    resp = await client.post("/api/services/register", json=b64(rec(Identity.generate())),
                             headers={"CF-Connecting-IP": "198.51.100.0"})
    assert resp.status == 200            # 198.51.100.0 holds 1 of 2
    resp = await client.post("/api/services/register", json=b64(rec(Identity.generate())),
                             headers={"X-Forwarded-For": "198.51.100.0"})
    assert resp.status == 429
    assert role.book.per_ip == {"198.51.100.0": 2, "198.51.100.1": 1}
    assert role.book.per_prefix == {"198.51.100.0/24": 3}


async def test_forwarding_headers_of_an_unnamed_peer_are_ignored(open_, monkeypatch) -> None:
    """Issue 20: rotating ``CF-Connecting-IP`` from a loopback peer escaped the per-IP limit.
    Without ``http.trusted_proxies`` the peer's own address is what counts."""
    client, role, _ = open_
    assert role.agent.config.http.trusted_proxies == ()
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 3)
    statuses = []
    for i in range(6):
        resp = await client.post("/api/services/register", json=b64(rec(Identity.generate())),
                                 headers={"CF-Connecting-IP": f"198.51.{i}.7",
                                          "X-Forwarded-For": f"203.0.{i}.9"})
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert role.book.per_ip == {"127.0.0.1": 3}


def test_client_ip_reads_headers_of_named_proxies_only() -> None:
    from aiohttp.test_utils import make_mocked_request

    from agent.forwarded import client_ip

    def req(remote: str, **headers: str) -> web.Request:
        r = make_mocked_request("POST", "/", headers={k.replace("_", "-"): v
                                                      for k, v in headers.items()})
        return r.clone(remote=remote)

    xff = {"X_Forwarded_For": "6.6.6.6, 203.0.113.5, 10.0.0.2"}
    assert client_ip(req("127.0.0.1", CF_Connecting_IP="6.6.6.6"), ()) == "127.0.0.1"
    assert client_ip(req("127.0.0.1", CF_Connecting_IP="6.6.6.6"),
                     ("127.0.0.1",)) == "6.6.6.6"
    # right to left, skipping the named proxies: the client the first proxy saw
    assert client_ip(req("127.0.0.1", **xff), ("127.0.0.0/8", "10.0.0.0/8")) == "203.0.113.5"
    assert client_ip(req("127.0.0.1", **xff), ("127.0.0.1",)) == "10.0.0.2"
    # a header that names no address is ignored; a peer outside the networks is itself
    assert client_ip(req("127.0.0.1", CF_Connecting_IP="nope"), ("127.0.0.1",)) == "127.0.0.1"
    assert client_ip(req("::ffff:192.0.2.1", CF_Connecting_IP="6.6.6.6"),
                     ("127.0.0.1", "::1")) == "192.0.2.1"
    assert client_ip(req("::1", X_Real_IP="2001:db8::7"), ("::1",)) == "2001:db8::7"


def test_networks_are_slash24_and_slash64() -> None:
    # the registry counts networks by the one rule (agent.netgroups) the DHT limits use
    assert network_of("198.51.100.7") == "198.51.100.0/24"
    assert network_of("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert network_of("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert network_of("not-an-ip") == "not-an-ip"
    assert reg_mod.network_of is network_of
