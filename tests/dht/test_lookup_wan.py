"""Lookups fit for slow links: a slow peer does not hold a lookup (alpha requests stay in
flight, refilled as answers come), and a warm lookup asks the nodes that answered last
time, all at once, and crawls only when they fail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack

from agent.dht.identity import Identity
from agent.dht.record import service_key
from agent.dht.server import DHTNode
from tests.dht.test_network import build, closer_than_all, rec_for, settled, stop_all
from tests.util import run_uvloop, tasks_ended


class Requests:
    """A node's transport that notes every request it sends: (rpc name, address)."""

    def __init__(self, transport: Any) -> None:
        self._t = transport
        self.sent: list[tuple[str, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if data[:1] == b"\x00":
            self.sent.append((msgpack.unpackb(data[21:])[0], tuple(addr)))
        self._t.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class HeldReplies:
    """A node's transport that holds its replies to one address until ``release``."""

    def __init__(self, transport: Any, to: tuple[str, int]) -> None:
        self._t = transport
        self.to = to
        self.held: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if data[:1] == b"\x01" and tuple(addr) == self.to:
            self.held.append((data, addr))
            return
        self._t.sendto(data, addr)

    def release(self) -> None:
        for data, addr in self.held:
            self._t.sendto(data, addr)
        self.held.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


@dataclass
class Net:
    """``n`` server nodes, the first ``workers`` of them announcing an "ocr" record, and a
    client-mode node joined through the first; ``tap`` notes the client's requests."""

    nodes: list[DHTNode]
    client: DHTNode
    want: set[bytes]
    tap: Requests


@asynccontextmanager
async def network(n: int, workers: int, **client_kw: Any) -> AsyncIterator[Net]:
    """The one set-up (and teardown: every node stopped, even those appended to
    ``nodes`` by the test) of these scenarios."""
    nodes = await build(n)
    client = DHTNode(Identity.generate(), mode="client", **client_kw)
    try:
        records = [rec_for(nodes[i].identity) for i in range(workers)]
        for i, rec in enumerate(records):
            assert await nodes[i].announce(rec) > 0
        await client.listen(0, "127.0.0.1")
        assert await client.bootstrap([("127.0.0.1", nodes[0].port)]) > 0
        tap = client.protocol.transport = Requests(client.protocol.transport)
        yield Net(nodes, client, {r.worker_id for r in records}, tap)
    finally:
        stop_all(nodes)
        client.stop()
        await tasks_ended()


def test_a_slow_peer_does_not_hold_the_lookup():
    """The node closest to the key holds its replies: the lookup asks the next
    candidates instead of waiting for it (its request is hedged, not timed out — the
    RTO is 10 s here) and returns every worker while that reply is still held."""
    async def scenario() -> None:
        async with network(12, 3, rto_min=10.0, rto_initial=10.0) as net:
            nodes, client, want = net.nodes, net.client, net.want
            kl = int.from_bytes(service_key("ocr"), "big")
            slow = min(nodes, key=lambda n: int.from_bytes(n.node.id, "big") ^ kl)
            tap = slow.protocol.transport = HeldReplies(slow.protocol.transport,
                                                        ("127.0.0.1", client.port))
            got = {r.worker_id for r in await client.find_providers("ocr")}
            assert got == want
            # the slow peer was asked, and its answer is still held: the lookup did not
            # wait for it, nor for a timeout
            assert tap.held
            st = client.stats()
            assert st["timeouts"] == 0 and st["outstanding"] >= 1
            tap.release()

    run_uvloop(scenario())


def test_warm_lookup_asks_the_remembered_nodes_first_and_crawls_when_they_fail():
    async def scenario() -> None:
        async with network(16, 3) as net:
            nodes, client, want, tap = net.nodes, net.client, net.want, net.tap
            key = service_key("ocr")
            # cold: a crawl from the client's routing table
            assert {r.worker_id for r in await client.find_providers("ocr")} == want
            hinted = {(n.ip, n.port) for n in client.hints.recall(key)}
            assert len(hinted) >= client.lookup_width
            assert client.stats()["warm_lookups"] == 0

            # warm: alpha (3) of the remembered nodes, all at once, and nobody else
            tap.sent.clear()
            assert {r.worker_id for r in await client.find_providers("ocr")} == want
            asked = [a for name, a in tap.sent if name == "find_providers"]
            assert len(asked) == client.alpha and set(asked) <= hinted
            st = client.stats()
            assert st["warm_lookups"] == 1 and st["warm_one_round"] == 1
            hinted = {(n.ip, n.port) for n in client.hints.recall(key)}
            assert hinted == set(asked)            # those answered: the next hint

            # a node closer to the key joins: the remembered nodes name it in their
            # answers, so the lookup does not end on them — it asks the newcomer too
            newcomer = DHTNode(closer_than_all(key, nodes))
            await newcomer.listen(0, "127.0.0.1")
            nodes.append(newcomer)
            assert await newcomer.bootstrap([("127.0.0.1", nodes[0].port)]) > 0
            await settled(nodes)
            tap.sent.clear()
            assert want <= {r.worker_id for r in await client.find_providers("ocr")}
            asked = [a for name, a in tap.sent if name == "find_providers"]
            assert ("127.0.0.1", newcomer.port) in asked
            assert client.stats()["warm_one_round"] == 1
            hinted = {(n.ip, n.port) for n in client.hints.recall(key)}

            # the remembered nodes die: the lookup asks them first, then crawls on and
            # still finds every worker (the others hold the records too: k = 20)
            by_port = {n.port: n for n in nodes}
            stop_all([by_port[p] for _h, p in hinted])
            tap.sent.clear()
            assert want <= {r.worker_id for r in await client.find_providers("ocr")}
            asked = [a for name, a in tap.sent if name == "find_providers"]
            assert set(asked[:client.alpha]) <= hinted     # the warm start first
            assert set(asked) - hinted, "no crawl beyond the failed hints"
            st = client.stats()
            assert st["warm_lookups"] == 3 and st["warm_one_round"] == 1
            # the next hint is made of nodes that answered
            assert not {(n.ip, n.port) for n in client.hints.recall(key)} & hinted

    run_uvloop(scenario())


def test_a_warm_lookup_never_settles_on_less_than_the_last_one_found():
    """The nodes a warm start asks agree with each other but all miss one worker's record
    (its stores to them were lost; the other closest nodes hold it): the lookup does not
    settle on their answer, it crawls on and finds every worker again."""
    async def scenario() -> None:
        async with network(16, 3) as net:
            nodes, client, want, tap = net.nodes, net.client, net.want, net.tap
            key = service_key("ocr")
            assert {r.worker_id for r in await client.find_providers("ocr")} == want
            # the warm start's quorum (``Crawl.warm``): of the ``width`` closest
            # remembered nodes, the ``alpha`` with the lowest expected RTT
            def rtt(n: Any) -> float:
                e = client.protocol.expected_rtt((n.ip, n.port))
                return float("inf") if e is None else e
            quorum = sorted(client.hints.recall(key)[:client.lookup_width], key=rtt)
            first = {(n.ip, n.port) for n in quorum[:client.alpha]}
            lost = sorted(want)[0]
            by_port = {n.port: n for n in nodes}
            for _h, port in first:
                assert by_port[port].storage.drop_where(lambda r: r.worker_id == lost) >= 1
            tap.sent.clear()
            assert {r.worker_id for r in await client.find_providers("ocr")} == want
            asked = [a for name, a in tap.sent if name == "find_providers"]
            assert set(asked[:client.alpha]) == first          # the warm start first ...
            assert set(asked) - first, "settled on the warm answer"   # ... then a crawl
            st = client.stats()
            assert st["warm_lookups"] == 1 and st["warm_short"] == 1
            assert st["warm_one_round"] == 0

    run_uvloop(scenario())


def test_proximity_neighbour_selection_asks_the_nearer_of_equally_close_first():
    """Among candidates in the same XOR log-distance class of the target, the one with
    the lowest measured RTT is asked first; a closer class still comes first, and with no
    RTT known the order is the exact distance."""
    from types import SimpleNamespace

    from kademlia.node import Node

    from agent.dht.crawling import Crawl

    target = bytes(20)
    # same class (top bit of the XOR set), a and b; c in a closer class
    a = Node(bytes([0x80]) + bytes(19), "127.0.0.1", 1)
    b = Node(bytes([0xC0]) + bytes(19), "127.0.0.1", 2)
    c = Node(bytes([0x01]) + bytes(19), "127.0.0.1", 3)
    rtts: dict[int, float] = {1: 0.300, 2: 0.020}
    proto = SimpleNamespace(source_node=Node(b"\xff" * 20), is_suspect=lambda nid: False,
                            expected_rtt=lambda addr: rtts.get(addr[1]), ksize=20)
    crawl = Crawl(proto, target, [a, b, c], width=3, alpha=1)  # type: ignore[arg-type]
    ready = [nid for _d, nid in crawl.order]
    assert ready == [c.id, a.id, b.id]                       # exact distance order
    assert crawl._pick(ready, 1) == [c.id]                  # the closer class first
    assert crawl._pick(ready[1:], 1) == [b.id]              # then the nearer by RTT
    rtts.clear()
    assert crawl._pick(ready[1:], 1) == [a.id]              # unknown: exact distance
