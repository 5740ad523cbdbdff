"""The coordinator's public seed list under a sybil flood (issue 20, item 6).

A real coordinator (DHTComponent + CoordinatorRole, its gateway route on a real aiohttp
server) and real DHT nodes on their own loopback addresses. Loopback is grouped like
public addresses here (``RMA_AGENT_DHT_LOOPBACK=strict``): ``127.a.b.c`` is host
``127.a.b.c``, network ``127.a.b.0/24``, block ``127.a.0.0/16``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.config import Address
from agent.dht.component import DHTComponent
from agent.dht.diversity import LOOPBACK_ENV
from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from agent.roles.coordinator import CoordinatorRole
from agent.roles.seeds import SeedBook
from tests.roles.fakes import FakeAgent, make_config

HONEST = [f"127.{10 + n}.0.1" for n in range(6)]          # six /16s, joined first
SYBILS = [f"127.200.{n}.1" for n in range(20)]            # 20 /24s of one /16, later


class Coord:
    def __init__(self, dht: DHTComponent, role: CoordinatorRole, server: TestServer) -> None:
        self.dht, self.role, self.server = dht, role, server

    async def seeds(self) -> list[str]:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.server.port}/api/dht/bootstrap") as resp:
            assert resp.status == 200
            return list((await resp.json())["seeds"])


@pytest.fixture
async def coord(tmp_path, monkeypatch) -> AsyncIterator[Coord]:
    monkeypatch.setenv(LOOPBACK_ENV, "strict")
    cfg = make_config(tmp_path, "coordinator")
    cfg = dataclasses.replace(cfg, dht=dataclasses.replace(
        cfg.dht, listen=Address("127.0.0.2", 0), mode="server"))
    agent = FakeAgent(cfg)
    dht = DHTComponent(agent)  # type: ignore[arg-type]
    agent.components.append(dht)
    role = CoordinatorRole(agent)  # type: ignore[arg-type]
    agent.components.append(role)
    await dht.start()
    app = web.Application()
    role.add_gateway_routes(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Coord(dht, role, server)
    finally:
        await server.close()
        await dht.stop()


async def _join(coord: Coord, ips: list[str], nodes: list[DHTNode],
                may_miss: int = 0) -> set[str]:
    """Start a DHT node on each address and bootstrap it from the coordinator; nodes the
    coordinator has not verified yet (its per-address budgets for unproven peers) ask it
    again, as a live node's lookups would. Returns the addresses in its routing table."""
    assert coord.dht.node is not None
    seed = ("127.0.0.2", coord.dht.node.port)
    mine: dict[str, DHTNode] = {}
    for ip in ips:
        n = DHTNode(Identity.generate())
        await n.listen(0, ip)
        nodes.append(n)
        mine[ip] = n
        await n.bootstrap([seed])
    for _ in range(50):
        table = {ip for _c, ip, _p in coord.dht.contacts()}
        missing = [ip for ip in ips if ip not in table]
        if len(missing) <= may_miss:
            break
        for ip in missing:
            await mine[ip].bootstrap([seed])
        await asyncio.sleep(0.1)        # pacing the asking again, as a live node's lookups
    return {ip for _c, ip, _p in coord.dht.contacts()} & set(ips)


def _ips(seeds: list[str]) -> list[str]:
    return [s.rsplit(":", 1)[0] for s in seeds]


async def test_sybils_on_many_slash24s_get_two_places(coord) -> None:
    """Issue 20: 20 sybils on 20 /24s held 17 of 20 places. Long-lived contacts come
    first and one /16 gets two places, however many /24s it spans."""
    nodes: list[DHTNode] = []
    try:
        assert await _join(coord, HONEST, nodes) == set(HONEST)
        first = _ips(await coord.seeds())                  # the coordinator notes them
        assert set(HONEST) <= set(first)
        sybils = await _join(coord, SYBILS, nodes, may_miss=10)
        assert len(sybils) >= 10, sybils                   # most made it into its table
        seeds = _ips(await coord.seeds())
        assert seeds[0] == "127.0.0.2"                     # its own address first
        assert seeds[1:7] == [ip for ip in first if ip in HONEST]   # oldest next
        sybil_places = [ip for ip in seeds if ip.startswith("127.200.")]
        assert len(sybil_places) == 2, seeds
        assert len(set(seeds)) == len(seeds)
    finally:
        for n in nodes:
            n.stop()


def test_seed_book_orders_by_age_and_caps_groups() -> None:
    clock = [100.0]
    book = SeedBook(clock=lambda: clock[0])
    old = [("a" * 40, "198.51.100.7", 8468), ("b" * 40, "203.0.113.9", 8468)]
    book.observe(old)
    clock[0] += 60
    new: list[Any] = [(f"{n:040x}", f"192.0.{n}.1", 8468) for n in range(2, 40)]
    picked = book.pick(new + old, 20)
    assert picked[:2] == [("198.51.100.7", 8468), ("203.0.113.9", 8468)]
    assert len([p for p in picked if p[0].startswith("192.0.")]) == 2    # one /16
    # a contact gone from the table is forgotten: back later, it is new again
    book.observe(new)
    assert ("a" * 40, "198.51.100.7", 8468) not in book.first_seen
    # private addresses group per IP (a LAN is one /16), v6 per /48 and /64
    lan = [(f"{n:040x}", f"10.0.0.{n}", 8468) for n in range(1, 6)]
    v6 = [(f"{n:040x}", f"2001:db8:0:{n}::1", 8468) for n in range(1, 6)]
    picked = book.pick(lan + v6, 20)
    assert len([p for p in picked if p[0].startswith("10.")]) == 5
    assert len([p for p in picked if ":" in p[0]]) == 2
