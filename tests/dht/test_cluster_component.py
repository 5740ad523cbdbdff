"""DHTComponent in process, on real UDP sockets (127.0.0.1, ephemeral ports):
readiness reasons, joining, snapshot seeds, reload, stats and Prometheus output."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from prometheus_client import generate_latest

from agent.config import Address
from agent.dht import bootstrap as seeds_mod
from agent.dht.component import DHTComponent, probe_reachable
from agent.dht.record import WorkerRecord
from tests.roles.fakes import FakeAgent, make_config
from tests.util import free_udp_tcp_port, wait_for_async


async def _until(pred: Any, limit: float = 10.0) -> None:
    await wait_for_async(pred, timeout=limit)


def _component(tmp_path, name: str, role: str = "worker", seeds: tuple[str, ...] = (),
               mode: str = "server") -> DHTComponent:
    cfg = make_config(tmp_path / name, role,
                      dht={"listen": Address("127.0.0.1", 0), "bootstrap": seeds, "mode": mode})
    cfg = dataclasses.replace(cfg, source=tmp_path / name / "agent.toml")
    agent = FakeAgent(cfg)
    comp = DHTComponent(agent)  # type: ignore[arg-type]
    agent.components.append(comp)
    return comp


def _seed(c: DHTComponent) -> str:
    assert c.node is not None
    return f"127.0.0.1:{c.node.port}"


async def test_readiness_reasons(tmp_path) -> None:
    lone = _component(tmp_path, "lone")
    first = _component(tmp_path, "first", role="coordinator")
    dead = _component(tmp_path, "dead", seeds=(f"127.0.0.1:{free_udp_tcp_port('127.0.0.1')}",
                                               "no-such-host.invalid:1"))
    for c in (lone, first, dead):
        await c.start()
    try:
        ok, why = lone.ready()
        assert not ok and "no bootstrap seeds configured" in why
        assert str(tmp_path / "lone" / "agent.toml") in why       # says which file to edit
        assert first.ready() == (True, "")                        # first seed of a network
        assert first.status() == "peers=0"
        await _until(lambda: dead.stats()["seeds"]["attempts"] >= 1)
        ok, why = dead.ready()
        assert not ok and why == "dht: joining, 1 seeds unreachable"
        failures = dead.stats()["seeds"]["failures"]
        assert len(failures) == 1 and "no-such-host.invalid" in failures[0]
    finally:
        for c in (lone, first, dead):
            await c.stop()


async def test_join_announce_lookup_stats_metrics(tmp_path) -> None:
    a = _component(tmp_path, "a", role="coordinator")
    await a.start()
    b = _component(tmp_path, "b", seeds=(_seed(a),))
    c = _component(tmp_path, "c", seeds=(_seed(a),), mode="client")
    await b.start()
    await c.start()
    try:
        await _until(lambda: b.joined and c.joined)
        assert "127.0.0.1" in b.node.storage.trusted   # type: ignore[union-attr]  # its seed
        assert not a.node.storage.trusted               # type: ignore[union-attr]  # no seeds
        assert b.ready() == (True, "") and b.status() == "peers=1"   # a only: c is a client
        assert c.status().endswith("(client)")
        rec = WorkerRecord.create(c.identity, name="c", services=["ocr"], endpoint="https://c",
                                  gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1,
                                  region="", ttl=30)
        assert await c.announce(rec) > 0
        found = await b.find_providers("ocr")
        assert [r.worker_id for r in found] == [c.identity.node_id]
        assert await a.find_providers("nothing-here") == []
        st = b.stats()
        assert st["node_id"] == b.identity.node_id.hex() and st["mode"] == "server"
        assert st["peers"] == 1 and st["lookups"]["total"] == 1 and st["lookups"]["hits"] == 1
        assert a.stats()["records_stored"] >= 1
        text = generate_latest(a.agent.registry).decode()   # type: ignore[attr-defined]
        for name in ("rma_agent_dht_peers 1.0", "rma_agent_dht_records ",
                     'rma_agent_dht_mode{mode="server"} 1.0', "rma_agent_dht_lookup_seconds_count",
                     'rma_agent_dht_rpc_received_total{rpc="identify"}',
                     "rma_agent_dht_rpc_retransmissions_total ", "rma_agent_dht_rpc_lost_total ",
                     "rma_agent_dht_contacts_removed_total 0.0",
                     "rma_agent_dht_contacts_false_deaths_total 0.0"):
            assert name in text, name
        assert 'rma_agent_dht_lookup_seconds_count 1.0' in generate_latest(
            b.agent.registry).decode()  # type: ignore[attr-defined]
    finally:
        for x in (c, b, a):
            await x.stop()


async def test_rejoins_from_snapshot_and_on_reload(tmp_path, caplog) -> None:
    a = _component(tmp_path, "a", role="coordinator")
    await a.start()
    # b: no configured seeds, but a routing snapshot naming a
    b = _component(tmp_path, "b", role="coordinator")
    seeds_mod.save_snapshot(b.agent.config.agent.state_dir, "00" * 20,
                            [("11" * 20, "127.0.0.1", a.node.port)])  # type: ignore[union-attr]
    # c: a dead seed first, then a reload gives it a live one
    c = _component(tmp_path, "c", seeds=(f"127.0.0.1:{free_udp_tcp_port('127.0.0.1')}",))
    await b.start()
    await c.start()
    try:
        await _until(lambda: b.joined)
        assert b.stats()["seeds"]["from_snapshot"] == 1
        await _until(lambda: c.stats()["seeds"]["attempts"] >= 1)
        assert not c.joined
        old = c.agent.config
        new = dataclasses.replace(old, dht=dataclasses.replace(
            old.dht, bootstrap=(_seed(a),), ksize=8))
        c.agent.config = new
        with caplog.at_level(logging.INFO, logger="rma_agent.dht"):
            await c.reload(old, new)
            await _until(lambda: c.joined, 3.0)     # at once, not after the backoff
        assert "apply on restart" in caplog.text and "ksize" in caplog.text
        assert "rejoining" in caplog.text
    finally:
        for x in (c, b, a):
            await x.stop()


async def test_reachability_probe(tmp_path) -> None:
    a = _component(tmp_path, "a", role="coordinator")
    b = _component(tmp_path, "b")
    await a.start()
    await b.start()
    try:
        assert a.node is not None and b.node is not None
        # b's DHT port answers pings: reachable
        assert await probe_reachable(("127.0.0.1", a.node.port), b.node.port, "127.0.0.1") is True
        # nothing listens on this port: the seed answers "not reachable"
        closed = free_udp_tcp_port("127.0.0.1")
        assert await probe_reachable(("127.0.0.1", a.node.port), closed, "127.0.0.1") is False
        # a fresh port of ours (post-join probe): answered by a stand-in responder
        assert await probe_reachable(("127.0.0.1", a.node.port), None, "127.0.0.1") is True
        # the "seed" itself is dead: no verdict at all
        assert await probe_reachable(("127.0.0.1", closed), b.node.port, "127.0.0.1",
                                     timeout=0.5) is None
    finally:
        await b.stop()
        await a.stop()


def test_bootstrap_route_never_advertises_loopback_to_remote_callers(tmp_path) -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from agent.dht import api

    comp = _component(tmp_path, "x", role="coordinator")
    comp.node = mock.Mock()          # only "started" matters here
    comp.agent.config = dataclasses.replace(comp.agent.config, dht=dataclasses.replace(
        comp.agent.config.dht, listen=Address("0.0.0.0", 8468)))

    def request(local: str, remote: str, headers: dict[str, str] | None = None) -> Any:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda k, d=None: {
            "sockname": (local, 8080), "peername": (remote, 5555)}.get(k, d)
        return make_mocked_request("GET", "/api/dht/bootstrap", transport=transport,
                                   headers=headers)

    assert api._own_seed(comp, request("192.0.2.7", "198.51.100.1")) == "192.0.2.7:8468"
    assert api._own_seed(comp, request("127.0.0.1", "127.0.0.1")) == "127.0.0.1:8468"
    # through a tunnel/proxy to a loopback HTTP port: no self-pointing seed
    assert api._own_seed(comp, request("127.0.0.1", "198.51.100.1")) is None
    assert api._own_seed(comp, request("127.0.0.1", "127.0.0.1",
                                       {"CF-Connecting-IP": "198.51.100.1"})) is None
    comp.mode = "client"
    assert api._own_seed(comp, request("192.0.2.7", "198.51.100.1")) is None


def test_start_failures_are_one_line_errors(tmp_path) -> None:
    """A taken UDP port or an unusable state dir: exit 1 with the reason, no traceback."""
    import socket

    from tests.cluster import Cluster

    with Cluster(tmp_path) as cl:
        busy = cl.coordinator("busy")
        blocked = cl.coordinator("blocked")
        (tmp_path / "file").write_text("")
        blocked.data["agent"]["state_dir"] = str(tmp_path / "file" / "state")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((busy.ip, busy.udp_port))
            cl.start(busy, blocked)
            for node, words in ((busy, f"cannot listen on udp {busy.dht_addr}"),
                                (blocked, "cannot load or create the node identity")):
                assert node.proc is not None
                assert node.proc.wait(20) == 1
                log = node.log_text()
                assert words in log and "Traceback" not in log, log


async def test_coordinator_republish_is_not_capped_by_per_sender_bound(tmp_path) -> None:
    """40 fallback registrations republished by one coordinator: the storing node that
    lists the coordinator as its seed keeps them all (80 records from one sender, over the
    per-sender bound of 64: each counts against its own worker's endpoint host); a node
    that does not trust it caps them."""
    import base64

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from agent.dht.identity import Identity
    from agent.roles.coordinator import CoordinatorRole

    def comp(name: str, ip: str, role: str, seeds: tuple[str, ...] = ()) -> DHTComponent:
        c = _component(tmp_path, name, role=role, seeds=seeds)
        cfg = c.agent.config
        c.agent.config = dataclasses.replace(cfg, dht=dataclasses.replace(
            cfg.dht, listen=Address(ip, 0)))
        return c

    a = comp("a", "127.0.0.2", "coordinator")
    await a.start()
    assert a.node is not None
    b = comp("b", "127.0.0.3", "worker", seeds=(f"127.0.0.2:{a.node.port}",))
    await b.start()
    assert b.node is not None
    c = comp("c", "127.0.0.4", "worker", seeds=(f"127.0.0.3:{b.node.port}",))
    await c.start()
    role = CoordinatorRole(a.agent)  # type: ignore[arg-type]
    a.agent.components.append(role)
    app = web.Application()
    role.add_routes(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        await _until(lambda: b.joined and c.joined and a.peers() == 2)
        for i in range(40):
            rec = WorkerRecord.create(Identity.generate(), name=f"w{i}", services=["ocr"],
                                      endpoint=f"https://w{i}", gpu="T4", gpu_memory_gb=16.0,
                                      load=0.0, capacity=1, region="",
                                      ttl=20)     # within the registry's keep (record_ttl)
            resp = await client.post("/api/services/register",
                                     json={"record": base64.b64encode(rec.encode()).decode()})
            assert resp.status == 200, await resp.text()
        assert b.node.storage.count() == 80                       # trusted: all kept
        assert c.node.storage.count() <= 64                       # untrusted sender: capped
        assert c.node.storage.refused["sender_full"] > 0
        found = await c.find_providers("ocr")                     # merged over both
        assert len(found) == 40
    finally:
        await client.close()
        for x in (c, b, a):
            await x.stop()


async def test_announce_recrawls_a_closest_set_cached_while_the_network_was_small(
        tmp_path) -> None:
    """A worker that announced among the first nodes must not keep republishing to those
    few nodes once the network has grown (DHTNode caches closest sets for 120 s)."""
    from agent.dht.identity import Identity
    from agent.dht.server import DHTNode

    seed = _component(tmp_path, "seed", role="coordinator")
    await seed.start()
    assert seed.node is not None
    w = _component(tmp_path, "w", seeds=(_seed(seed),))
    await w.start()
    others: list[DHTNode] = []
    try:
        await _until(lambda: w.joined)

        def rec() -> WorkerRecord:
            return WorkerRecord.create(w.identity, name="w", services=["ocr"],
                                       endpoint="https://w", gpu="T4", gpu_memory_gb=1.0,
                                       load=0.0, capacity=1, region="", ttl=60)

        first = await w.announce(rec())
        assert first <= 4                    # 2 keys x (seed + local copy)
        for _ in range(24):
            n = DHTNode(Identity.generate())
            await n.listen(0, "127.0.0.1")
            await n.bootstrap([("127.0.0.1", seed.node.port)])
            others.append(n)
        await _until(lambda: w.peers() >= 20)
        again = await w.announce(rec())
        assert again >= 30, again            # re-crawled: stored on ~k nodes per key
        found = [bool(await n.find_providers("ocr")) for n in others]
        assert all(found)
    finally:
        for n in others:
            n.stop()
        await w.stop()
        await seed.stop()
