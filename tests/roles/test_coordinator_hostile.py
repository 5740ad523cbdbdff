"""The coordinator's registry attacked over real sockets (issue 20, items 4 and 6).

The registry runs in process behind a real aiohttp server on 127.0.0.1; clients bind
their own loopback source addresses (``127.0.5.1``, ``127.0.6.1``, ...) so each request
really comes from the IP, /24 and network the test names — no forwarding headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.httpapi import json_errors
from agent.roles import registry as reg_mod
from agent.roles.coordinator import CoordinatorRole
from tests.roles.fakes import FakeAgent, FakeDHT, make_config
from tests.util import wait_for_async


def rec(ttl: float = 20) -> WorkerRecord:
    return WorkerRecord.create(Identity.generate(), name="w", services=("ocr",),
                               endpoint="https://w.example", gpu="T4", gpu_memory_gb=16.0,
                               load=0.0, capacity=4, region="eu", ttl=ttl)


def body(r: WorkerRecord) -> bytes:
    return json.dumps({"record": base64.b64encode(r.encode()).decode()}).encode()


class Coord:
    def __init__(self, server: TestServer, role: CoordinatorRole, dht: FakeDHT) -> None:
        self.server, self.role, self.dht = server, role, dht
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def register(self, r: WorkerRecord, src: str = "127.0.0.1") -> tuple[int, Any]:
        """POST the record from source address ``src``; (status, JSON)."""
        session = self._sessions.get(src)
        if session is None:
            session = self._sessions[src] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=(src, 0)))
        async with session.post(f"http://127.0.0.1:{self.port}/api/services/register",
                                data=body(r)) as resp:
            return resp.status, await resp.json()

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()


@pytest.fixture
async def coord(tmp_path) -> AsyncIterator[Coord]:
    dht = FakeDHT(Identity.generate())
    agent = FakeAgent(make_config(tmp_path, "coordinator"), dht)
    role = CoordinatorRole(agent)  # type: ignore[arg-type]
    agent.components.append(role)
    app = web.Application(middlewares=[json_errors])
    role.add_routes(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    c = Coord(server, role, dht)
    try:
        yield c
    finally:
        await c.close()
        await server.close()


async def test_one_slash24_is_bounded_whatever_its_ip_count(coord, monkeypatch) -> None:
    """Issue 20: 42 IPs of one /24 filled the registry. Per-IP quotas multiply with IPs;
    the /24 quota does not."""
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 4)
    monkeypatch.setattr(reg_mod, "MAX_PER_PREFIX", 6)
    results = [await coord.register(rec(), f"127.0.5.{1 + i // 4}") for i in range(12)]
    assert [s for s, _ in results] == [200] * 6 + [429] * 6
    assert "127.0.5.0/24" in results[6][1]["error"]
    assert coord.role.book.per_prefix == {"127.0.5.0/24": 6}
    status, answer = await coord.register(rec(), "127.0.6.1")        # another network
    assert status == 200, answer


async def test_last_places_are_kept_for_newcomers(coord, monkeypatch) -> None:
    """When one /24 (or several big ones) filled the open part, an honest newcomer from a
    network of its own still registers; the flooders cannot take the reserve."""
    monkeypatch.setattr(reg_mod, "REGISTRY_MAX", 20)              # 16 open, 4 reserved
    monkeypatch.setattr(reg_mod, "MAX_PER_IP", 1000)
    monkeypatch.setattr(reg_mod, "MAX_PER_PREFIX", 1000)
    flood = [await coord.register(rec(), f"127.0.5.{1 + i % 8}") for i in range(24)]
    assert [s for s, _ in flood] == [200] * 16 + [429] * 8
    assert "kept for networks with few workers" in flood[-1][1]["error"]
    assert len(coord.role.registry) == 16
    # a flooder on a fresh IP of its /24 is still a big network: refused
    status, _ = await coord.register(rec(), "127.0.5.200")
    assert status == 429
    # newcomers from small networks take the reserve, then the registry is full
    for n in range(4):
        status, answer = await coord.register(rec(), f"127.0.{10 + n}.1")
        assert status == 200, answer
    status, answer = await coord.register(rec(), "127.0.30.1")
    assert status == 503 and "full" in answer["error"]
    assert len(coord.role.registry) == 20


async def test_long_lived_records_are_kept_but_not_republished(coord) -> None:
    """A record that claims to live an hour is kept ``dht.record_ttl`` seconds: it is not
    put into the DHT, where it would outlive the registry entry."""
    ttl = coord.role.agent.config.dht.record_ttl
    status, answer = await coord.register(rec(ttl=3600))
    assert status == 200 and answer["republished_on"] == 0
    assert answer["republish"].startswith("no: the record lives past")
    assert coord.dht.announced == [] and len(coord.role.registry) == 1
    status, answer = await coord.register(rec(ttl=ttl))
    assert status == 200 and answer["republished_on"] == coord.dht.stores_on
    assert len(coord.dht.announced) == 1


async def test_body_split_over_two_tcp_segments(coord) -> None:
    """Issue 20: ``content.read(n)`` returned the first segment only, so a registration
    whose body arrived in two segments was a 400."""
    payload = body(rec())
    reader, writer = await asyncio.open_connection("127.0.0.1", coord.port)
    try:
        writer.write(b"POST /api/services/register HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
                     + payload[:40])
        await writer.drain()
        # the second segment goes out only once the server took the first one into its
        # handler (the registration's rate-limit bucket exists then)
        await wait_for_async(lambda: coord.role.book._ip_rate._b,
                             what="the registration's rate-limit bucket")
        writer.write(payload[40:])
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:400]
    assert json.loads(rest)["result"] == "stored"
    assert len(coord.role.registry) == 1


async def test_deeply_nested_json_is_a_400(coord) -> None:
    """Issue 20: JSON nested 30,000 deep was a 500 with a traceback."""
    async with aiohttp.ClientSession() as s:
        for raw in (b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
            async with s.post(f"http://127.0.0.1:{coord.port}/api/services/register",
                              data=raw) as resp:
                answer = await resp.json()
                assert resp.status == 400, answer
                assert "nested" in answer["error"]
    status, answer = await coord.register(rec())
    assert status == 200, answer
