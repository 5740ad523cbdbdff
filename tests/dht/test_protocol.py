"""RMAProtocol pieces: RTT estimation, rate-limited peer logs, refused plain stores,
answers that always fit one datagram, the reachability probe, kademlia interop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time

import msgpack
from kademlia.network import Server
from kademlia.node import Node

from agent.dht.component import probe_reachable
from agent.dht.identity import Identity
from agent.dht.protocol import MAX_PAYLOAD, RttEstimator, parse_nodes
from agent.dht.record import WorkerRecord, service_key
from agent.dht.server import DHTNode
from agent.ratelimit import RateLimiter
from tests.util import free_port, run_uvloop, wait_for_async


def test_rtt_estimator_adapts_and_is_clamped():
    e = RttEstimator()
    assert e.rto(0.05, 2.0, 0.5) == 0.5          # no sample yet: initial
    for _ in range(50):
        e.sample(0.001)
    assert e.rto(0.05, 2.0, 0.5) == 0.05         # LAN-fast peer: the floor, not 5 s
    for _ in range(50):
        e.sample(0.3)
    assert 0.3 <= e.rto(0.05, 2.0, 0.5) < 0.5   # slower path: follows it
    e.backoff = 64
    assert e.rto(0.05, 2.0, 0.5) == 2.0          # back-off is capped by the ceiling
    e.sample(0.3)
    assert e.backoff == 1.0


def test_rate_limited_peer_log(caplog):
    rl = RateLimiter(rate=0.1, burst=5, logger=logging.getLogger("test.rl"))
    with caplog.at_level(logging.WARNING, logger="test.rl"):
        for i in range(10_000):
            rl(logging.WARNING, "bad", "peer %d sent junk", i)
    assert len(caplog.records) == 5
    assert rl.suppressed["bad"] == 9_995


def test_parse_nodes_skips_junk():
    good = [os.urandom(20), "127.0.0.1", 4000]
    junk = [[b"short", "1.2.3.4", 1], [os.urandom(20), 5, 1], [os.urandom(20), "x", 0],
            "str", None, [os.urandom(20), "h" * 100, 80], [os.urandom(20), "h", 70000]]
    assert parse_nodes([*junk, good]) == [tuple(good)]
    assert parse_nodes({"a": 1}) == []


def test_wire_behaviour():
    async def scenario():
        a, b = DHTNode(Identity.generate()), DHTNode(Identity.generate())
        await a.listen(0, "127.0.0.1")
        await b.listen(0, "127.0.0.1")
        plain = Server()
        await plain.listen(0, "127.0.0.1")
        try:
            assert await b.bootstrap([("127.0.0.1", a.port)]) == 1
            pa = a.protocol
            addr_b = ("127.0.0.1", b.port)

            # plain kademlia store is refused: any peer could overwrite any key with it
            ok, res = await pa.call(addr_b, "store", a.node.id, os.urandom(20), b"value")
            assert ok and res is False and b.protocol.drops["store_refused"] == 1

            # a find_providers answer fits one datagram even for a huge service
            key = service_key("big")
            for i in range(300):
                ident = Identity.generate()
                rec = WorkerRecord.create(
                    ident, name="n" * 40, services=("big",), endpoint="https://" + "e" * 80,
                    gpu="g" * 8, gpu_memory_gb=1.0, load=float(i), capacity=4, region="r",
                    ttl=300)
                b.storage.put(key, rec)
            ok, res = await pa.call(addr_b, "find_providers", a.node.id, key)
            assert ok and 20 <= len(res["records"]) <= 24
            assert len(msgpack.packb(res, use_bin_type=True)) <= MAX_PAYLOAD

            # reachability, as mode = "auto" asks it (component.probe_reachable, from a
            # fresh socket): True for our live DHT port, False for a port nobody serves,
            # None when the "seed" does not answer at all
            assert await probe_reachable(addr_b, a.port, "127.0.0.1") is True
            assert await probe_reachable(addr_b, free_port(socket.SOCK_DGRAM), "127.0.0.1") is False
            assert await probe_reachable(("127.0.0.1", free_port(socket.SOCK_DGRAM)), a.port, "127.0.0.1",
                                         timeout=0.3) is None
            assert await b.protocol.handlers.rpc_reachable(("127.0.0.1", 9), b"", 9) is False

            # a dead peer costs two adaptive timeouts (one retransmission) of at most the
            # RTO ceiling (2 s), not rpcudp's fixed 5 s: the state says which timer ran
            ok, _ = await pa.call(("127.0.0.1", 9), "ping", a.node.id)
            assert not ok
            assert pa.stats()["retransmissions"] >= 1
            assert pa.stats()["timeouts"] >= 1
            assert pa.rto(("127.0.0.1", 9)) <= pa.engine.rto_max == 2.0

            # a contact that misses one reply is suspect (crawls skip it) but stays in
            # the routing table: removal takes several misses spread over time
            # (tests/dht/test_liveness.py)
            ghost = Node(os.urandom(20), "127.0.0.1", 9)
            pa.router.add_contact(ghost)
            assert not pa.router.is_new_node(ghost)
            await pa.call_ping(ghost)
            assert ghost in pa.router
            assert pa.is_suspect(ghost.id)

            # plain kademlia peers can still ping and route through us
            pport = plain.transport.get_extra_info("sockname")[1]
            found = await plain.bootstrap([("127.0.0.1", a.port)])
            assert found  # it learned a neighbour list from our find_node answer
            assert await pa.call_ping(Node(plain.node.id, "127.0.0.1", pport)) != (False, None)
        finally:
            a.stop()
            b.stop()
            plain.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_refresh_table_keeps_its_interval():
    async def scenario():
        n = DHTNode(Identity.generate(), refresh_interval=0.05)
        await n.listen(0, "127.0.0.1")
        calls = []
        fourth = asyncio.Event()
        orig = n._refresh_table

        async def counting():
            calls.append(time.monotonic())
            if len(calls) >= 4:
                fourth.set()
            await orig()

        n._refresh_table = counting  # type: ignore[method-assign]
        try:
            # four refreshes come (kademlia would have fallen back to 3600 s after one
            # run and this would time out); the wait is generous, the event is the test
            await asyncio.wait_for(fourth.wait(), 30)
        finally:
            n.stop()
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert min(gaps) >= 0.04   # each one a refresh interval after the last

    run_uvloop(scenario())


def test_listen_requires_interface_and_plain_api_is_closed():
    import inspect

    import pytest
    sig = inspect.signature(DHTNode.listen)
    assert sig.parameters["interface"].default is inspect.Parameter.empty
    with pytest.raises(ValueError):
        DHTNode(Identity.generate(), mode="bogus")

    # the node is not a kademlia Server: its plain-value API does not exist at all
    n = DHTNode(Identity.generate())
    for name in ("get", "set", "set_digest", "save_state_regularly", "refresh_table"):
        assert not hasattr(n, name), name


def test_large_replies_rate_limited_per_source_ip():
    async def scenario():
        n = DHTNode(Identity.generate())
        await n.listen(0, "127.0.0.1")
        p = n.protocol.engine
        p.reply_rate = 10_000  # 10 kB/s, burst 20 kB
        sent = []
        p._send = lambda data, addr: sent.append(len(data)) or True  # type: ignore[method-assign]
        # addresses that answered us before (proven): only the rate limit applies to them
        # (unproven ones get at most 3x what they sent, see test_hostile_wire)
        for addr in (("198.51.100.7", 4000), ("203.0.113.9", 4000)):
            n.protocol.gate.budget.prove(addr)
        try:
            big = {"records": [b"x" * 300] * 20, "nodes": []}
            for _ in range(50):
                p.respond(os.urandom(20), big, ("198.51.100.7", 4000))
            assert 2 <= len(sent) <= 4 and p.drops["reply_rate_limited"] >= 46
            p.respond(os.urandom(20), big, ("203.0.113.9", 4000))  # another IP: own budget
            p.respond(os.urandom(20), b"small", ("198.51.100.7", 4000))  # small: unlimited
            for _ in range(50):
                p.respond(os.urandom(20), big, ("127.0.0.1", 4000))  # loopback: exempt
            assert len(sent) >= 2 + 1 + 1 + 50
        finally:
            n.stop()

    run_uvloop(scenario())


def test_reachability_probe_sees_through_a_stateful_firewall():
    """A node that only accepts datagrams from addresses it sent to (a NAT / stateful
    firewall) must be told "not reachable", although the asking seed answers it."""
    class Firewall(asyncio.DatagramProtocol):
        """Between the socket and the node: lets in only datagrams from addresses the
        node sent to (the transport's sends are counted by ``sendto``)."""

        def __init__(self, transport, inner):
            self.contacted: set = set()
            self.inner, self._t = inner, transport

        def sendto(self, data, addr=None):
            self.contacted.add(tuple(addr[:2]))
            self._t.sendto(data, addr)

        def __getattr__(self, name):
            return getattr(self._t, name)

        def datagram_received(self, data, addr):
            if tuple(addr[:2]) in self.contacted:
                self.inner.datagram_received(data, addr)

    async def scenario():
        seed = DHTNode(Identity.generate())
        open_node = DHTNode(Identity.generate(), mode="auto")
        natted = DHTNode(Identity.generate(), mode="auto")
        for n in (seed, open_node, natted):
            await n.listen(0, "127.0.0.1")
        fw = Firewall(natted.transport, natted.protocol.engine)
        natted.transport.set_protocol(fw)       # inbound through the firewall
        natted.protocol.transport = fw          # outbound noted by it
        try:
            addr = ("127.0.0.1", seed.port)
            # what mode = "auto" does before joining: ask from a fresh socket for a ping
            # to our DHT port
            assert await probe_reachable(addr, open_node.port, "127.0.0.1") is True
            assert await probe_reachable(addr, natted.port, "127.0.0.1") is False
            # and after traffic (its DHT socket has talked to the seed): still False, the
            # seed's ping leaves from a port the firewall never sent to
            natted.set_mode("client")
            await natted.bootstrap([addr])
            assert await probe_reachable(addr, natted.port, "127.0.0.1") is False
            # the post-join variant (port=None: a fresh answering port) sees an open path
            assert await probe_reachable(addr, None, "127.0.0.1") is True
            # yet the NAT-ed node uses the DHT as a client
            assert natted.peers() == 1
            assert seed.peers() == 0 or all(c[2] != natted.port for c in seed.contacts())
        finally:
            for n in (seed, open_node, natted):
                n.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_contact_with_a_forged_id_is_not_added():
    """A peer's node list can pair a made-up id with an honest node's address. The honest
    node answers our query, but that does not prove the id: the contact is pinged first
    and refused because the ping answers with the real id."""
    async def scenario():
        a, b = DHTNode(Identity.generate()), DHTNode(Identity.generate())
        await a.listen(0, "127.0.0.1")
        await b.listen(0, "127.0.0.1")
        try:
            pa = a.protocol
            forged = Node(os.urandom(20), "127.0.0.1", b.port)
            ok, _ = await pa.call_find_node(forged, Node(os.urandom(20)))
            assert ok                                   # b answered the query ...
            await wait_for_async(lambda: pa.drops["contact_id_mismatch"] >= 1,
                                 what="the forged id's contact check refused")
            assert pa.drops["contact_id_mismatch"] == 1  # ... but not with that id
            ids = {n.id for n in pa.router.all_contacts()}
            assert forged.id not in ids

            honest = Node(b.node.id, "127.0.0.1", b.port)
            ok, _ = await pa.call_find_node(honest, Node(os.urandom(20)))
            await wait_for_async(lambda: b.node.id in {n.id for n in pa.router.all_contacts()},
                                 what="the honest id added as a contact")
        finally:
            a.stop()
            b.stop()

    run_uvloop(scenario())
