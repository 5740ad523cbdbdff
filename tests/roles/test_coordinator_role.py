"""CoordinatorRole in process: registration endpoint, registry, republish, snapshot."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.dht import bootstrap as seeds_mod
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.httpapi import json_errors
from agent.roles.coordinator import CoordinatorRole
from tests.roles.fakes import FakeAgent, FakeDHT, make_config

W1 = Identity.generate()
W2 = Identity.generate()


def rec(ident: Identity = W1, **kw: Any) -> WorkerRecord:
    args: dict[str, Any] = dict(name="w1", services=("ocr", "asr"), endpoint="https://w1.example",
                                gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=4, region="eu",
                                ttl=20)
    args.update(kw)
    return WorkerRecord.create(ident, **args)


def b64(r: WorkerRecord | bytes) -> str:
    return base64.b64encode(r if isinstance(r, bytes) else r.encode()).decode()


@pytest.fixture
async def coord(tmp_path) -> AsyncIterator[tuple[TestClient, CoordinatorRole, FakeDHT]]:
    dht = FakeDHT(Identity.generate())
    agent = FakeAgent(make_config(tmp_path, "coordinator"), dht)
    role = CoordinatorRole(agent)  # type: ignore[arg-type]
    agent.components.append(role)
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    role.add_routes(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    await role.start()
    try:
        yield client, role, dht
    finally:
        await role.stop()
        await client.close()


async def test_register_verifies_stores_and_republishes(coord) -> None:
    client, _role, dht = coord
    r = rec()
    resp = await client.post("/api/services/register", json={"record": b64(r)})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["worker_id"] == W1.node_id.hex() and body["result"] == "stored"
    assert body["republished_on"] == dht.stores_on
    assert dht.announced[-1].encode() == r.encode()      # republished as signed, unaltered
    for service in ("ocr", "asr", "*"):
        resp = await client.get(f"/api/registry/{service}")
        got = (await resp.json())["records"]
        assert [WorkerRecord.decode(base64.b64decode(x)).encode() for x in got] == [r.encode()]
    resp = await client.get("/api/registry/llm")
    assert (await resp.json())["records"] == []


async def test_newest_sequence_per_worker(coord) -> None:
    client, role, _dht = coord
    old, new = rec(name="old"), rec(name="new")
    other = rec(W2, name="w2")
    for r in (old, new, other):
        assert (await client.post("/api/services/register", json={"record": b64(r)})).status == 200
    resp = await client.post("/api/services/register", json={"record": b64(old)})
    assert resp.status == 409 and "newer sequence" in (await resp.json())["error"]
    resp = await client.post("/api/services/register", json={"record": b64(new)})
    assert resp.status == 200 and (await resp.json())["result"] == "duplicate"
    names = sorted(WorkerRecord.decode(base64.b64decode(x)).name for x in
                   (await (await client.get("/api/registry/ocr")).json())["records"])
    assert names == ["new", "w2"]     # both workers coexist, each at its newest record
    tomb = new.tombstone(W1)
    assert (await client.post("/api/services/register", json={"record": b64(tomb)})).status == 200
    names = [WorkerRecord.decode(base64.b64decode(x)).name for x in
             (await (await client.get("/api/registry/ocr")).json())["records"]]
    assert names == ["w2"]            # the withdrawn worker is gone
    assert role.status() == "registry=1"
    st = role.stats()["coordinator"]
    assert st["registrations"] == 5 and st["rejected"] == 1 and st["registry_tombstones"] == 1


def _tampered_signature() -> str:
    r = rec()
    bad = dataclasses.replace(r, signature=bytes(64))
    return b64(bad.encode())


def _altered_field() -> str:
    r = rec()
    return b64(dataclasses.replace(r, endpoint="https://evil.example").encode())


def _foreign_key() -> str:
    r = rec()   # signed by W1, but claims W2's key: worker_id no longer matches
    return b64(dataclasses.replace(r, public_key=W2.public_key).encode())


def _body(b64text: str) -> bytes:
    return json.dumps({"record": b64text}).encode()


# bodies are built when the test runs: records made at import time could expire first
@pytest.mark.parametrize(("make_raw", "status", "words"), [
    (lambda: b"not json", 400, "JSON"),
    (lambda: b"[1, 2]", 400, "expected"),
    (lambda: b'{"rec": "x"}', 400, "expected"),
    (lambda: b'{"record": 5}', 400, "expected"),
    (lambda: b'{"record": "***not base64***"}', 400, "base64"),
    (lambda: _body(b64(b"\x93\x01\x02\x03")), 422, "rejected"),
    (lambda: _body(b64(b"\xff" * 100)), 422, "rejected"),
    (lambda: _body(_tampered_signature()), 422, "signature"),
    (lambda: _body(_altered_field()), 422, "signature"),
    (lambda: _body(_foreign_key()), 422, "worker_id"),
    (lambda: _body(b64(rec(now=time.time() - 100))), 422, "expired"),
    (lambda: _body(b64(rec(now=time.time() + 600))), 422, "future"),
    (lambda: _body("A" * 20000), 413, "too large"),
])
async def test_bad_registrations_are_4xx_json(coord, make_raw: Any, status: int,
                                              words: str) -> None:
    client, role, dht = coord
    resp = await client.post("/api/services/register", data=make_raw(),
                             headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == status, body
    assert words.lower() in body["error"].lower(), body
    assert role.registry == {} and dht.announced == []


async def test_oversized_body_and_bad_service(coord) -> None:
    client, _role, _dht = coord
    resp = await client.post("/api/services/register", data=b"x" * (70 * 1024))
    assert resp.status == 413 and "error" in await resp.json()
    resp = await client.get("/api/registry/bad%20name")
    assert resp.status == 400 and "error" in await resp.json()
    resp = await client.get("/api/registry/ocr?limit=abc")
    assert resp.status == 400


async def test_snapshot_written_on_stop_and_not_emptied(tmp_path) -> None:
    dht = FakeDHT(Identity.generate())
    agent = FakeAgent(make_config(tmp_path, "coordinator"), dht)
    role = CoordinatorRole(agent)  # type: ignore[arg-type]
    agent.components.append(role)
    state = agent.config.agent.state_dir
    dht._contacts = [("aa" * 20, "127.0.0.7", 4000)]
    await role.start()
    await role.stop()
    assert seeds_mod.load_snapshot(state) == [("127.0.0.7", 4000)]
    dht._contacts = []             # lost every peer: keep the old seeds for the next start
    await role.start()
    await role.stop()
    assert seeds_mod.load_snapshot(state) == [("127.0.0.7", 4000)]
