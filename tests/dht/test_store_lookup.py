"""The announce's store lookup (``agent.dht.store_lookup``): stores overlap the crawl,
yet the count it returns covers only the final k closest, and a closer node found late
still gets the record; the write tokens of the window's nodes are fetched ahead (an
``identify`` beside the ``find_node``) so their stores need no challenge.

A scripted protocol stands in for the network: each peer's ``find_node`` answer is
given, and held on an event where the order of answers matters, so every case is
decided by events (no sleeps, no timing)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from kademlia.node import Node

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.dht.server import DHTNode
from agent.dht.store_lookup import StoreLookup
from tests.util import run_uvloop

TARGET = bytes(20)


def peer(first: int, n: int) -> Node:
    """A node whose id starts with byte ``first`` (its distance class to TARGET), on its
    own /24 so the diversity window never applies."""
    return Node(bytes([first]) + bytes(18) + bytes([n]), f"10.{n}.0.1", 4000 + n)


class Scripted:
    """Just what a crawl asks of ``RMAProtocol``: answers per peer, optional gates."""

    def __init__(self, answers: dict[bytes, Any]) -> None:
        self.source_node = Node(b"\xff" * 20)
        self.ksize = 20
        self.drops: Counter[str] = Counter()
        self.answers = answers                   # id -> list of nodes, or None: fails
        self.gates: dict[bytes, asyncio.Event] = {}
        self.on_store: dict[bytes, list[asyncio.Event]] = {}
        self.on_answer: dict[bytes, list[asyncio.Event]] = {}
        self.stored: list[bytes] = []
        self.answered: list[bytes] = []
        self.fast_rtt = None
        self.tokens: set[bytes] | None = None    # ids whose token we hold; None: all
        self.fetched: list[bytes] = []           # ids sent an identify for a token
        self.never = asyncio.Event()

    def is_suspect(self, nid: bytes) -> bool:
        return False

    def expected_rtt(self, addr: Any) -> None:
        return None

    def peer_srtt(self, addr: Any) -> None:
        return None

    def rto(self, addr: Any = None) -> float:
        return 1.0

    def retransmitting(self, addr: Any) -> bool:
        return False

    async def call_find_node(self, node: Node, target: Node) -> tuple[bool, Any]:
        gate = self.gates.get(node.id)
        if gate is not None:
            await gate.wait()
        for ev in self.on_answer.get(node.id, []):
            ev.set()
        got = self.answers[node.id]
        if got is None:
            return (False, None)
        self.answered.append(node.id)
        return (True, [[n.id, n.ip, n.port] for n in got])

    def holds_token(self, node: Node) -> bool:
        return self.tokens is None or node.id in self.tokens

    async def fetch_token(self, node: Node) -> bool:
        self.fetched.append(node.id)
        await self.never.wait()      # unanswered (an old agent) until the test ends
        return False                 # never learned: the node keeps looking tokenless

    async def call_announce(self, node: Node, key: bytes, record: bytes) -> tuple[bool, Any]:
        assert key == TARGET and record == b"rec"
        self.stored.append(node.id)
        for ev in self.on_store.get(node.id, []):
            ev.set()
        return (True, True)


def test_a_store_outside_the_final_set_is_not_counted_and_late_closer_nodes_get_it():
    """A answers first with nothing new: it is among the 2 closest known, so it is sent
    the record at once. B's answer (held until then) brings C and D, closer than A:
    they are asked, stored, and are the final set. A acknowledged, but the count is 2."""
    a, b, c, d = peer(0x40, 1), peer(0x80, 2), peer(0x01, 3), peer(0x02, 4)

    async def scenario() -> None:
        proto = Scripted({a.id: [], b.id: [c, d], c.id: [], d.id: []})
        proto.gates[b.id] = asyncio.Event()
        proto.on_store[a.id] = [proto.gates[b.id]]
        crawl = StoreLookup(proto, TARGET, [a, b], width=2, alpha=2,  # type: ignore[arg-type]
                            record=b"rec")
        final, stored = await crawl.store()
        assert {n.id for n in final} == {c.id, d.id}
        assert set(proto.stored) == {a.id, c.id, d.id}       # A was stored early ...
        assert stored == 2                                     # ... and is not counted
        assert crawl.wasted == 1 and crawl.early == 3

    run_uvloop(scenario())


def test_a_member_freed_by_a_failure_is_stored_after_the_crawl():
    """E answers while A and B (closer, asked) may still answer: outside the 2 closest,
    it is not stored then. A fails, so E is in the final set: it gets the record after
    the crawl, and is counted."""
    a, b, e = peer(0x01, 1), peer(0x02, 2), peer(0x40, 3)

    async def scenario() -> None:
        proto = Scripted({a.id: None, b.id: [], e.id: []})
        proto.gates[a.id] = asyncio.Event()
        proto.gates[b.id] = asyncio.Event()
        proto.on_answer[e.id] = [proto.gates[a.id]]     # A fails only after E answered
        proto.on_answer[a.id] = [proto.gates[b.id]]     # and B answers after that
        crawl = StoreLookup(proto, TARGET, [a, b, e], width=2, alpha=3,  # type: ignore[arg-type]
                            record=b"rec")
        final, stored = await crawl.store()
        assert [n.id for n in final] == [b.id, e.id]
        assert proto.stored.count(e.id) == 1 and a.id not in proto.stored
        assert proto.stored.index(b.id) < proto.stored.index(e.id)   # E: after the crawl
        assert stored == 2 and crawl.wasted == 0

    run_uvloop(scenario())


def test_the_final_round_sends_the_record_with_the_question():
    """Once the crawl converged (A's answer brought nothing closer), B is asked in the
    final round together with the record: B's answer is held until B's store was sent,
    and the lookup still completes with both stored. Before convergence nobody is
    stored ahead of its answer: A's store follows A's answer."""
    a, b = peer(0x01, 1), peer(0x02, 2)

    async def scenario() -> None:
        proto = Scripted({a.id: [], b.id: []})
        proto.gates[b.id] = asyncio.Event()
        proto.on_store[b.id] = [proto.gates[b.id]]   # B answers after its store
        events: list[str] = []
        name = {a.id: "a", b.id: "b"}

        async def announce(node: Node, key: bytes, record: bytes,
                           inner: Any = proto.call_announce) -> tuple[bool, Any]:
            events.append(f"store {name[node.id]}")
            return await inner(node, key, record)

        async def find_node(node: Node, target: Node, inner: Any = proto.call_find_node
                            ) -> tuple[bool, Any]:
            got = await inner(node, target)
            events.append(f"answer {name[node.id]}")
            return got

        proto.call_announce = announce  # type: ignore[method-assign]
        proto.call_find_node = find_node  # type: ignore[method-assign]
        crawl = StoreLookup(proto, TARGET, [a, b], width=2, alpha=1,  # type: ignore[arg-type]
                            record=b"rec")
        final, stored = await crawl.store()
        assert [n.id for n in final] == [a.id, b.id] and stored == 2
        assert events.index("answer a") < events.index("store a"), events
        assert events.index("store b") < events.index("answer b"), events

    run_uvloop(scenario())


def test_extra_stores_are_bounded():
    """Round after round a node answers, is stored, and is displaced by closer ones
    that its slower partner's answer reveals: early stores stop at ``width +
    max_extra``; the final closest nodes still get the record."""
    xs = [peer(0x80 >> i, i + 1) for i in range(7)]                 # ever closer
    ys = [peer((0x80 >> i) | (0x40 >> i), 20 + i) for i in range(7)]  # just behind each

    async def scenario() -> None:
        answers: dict[bytes, Any] = {x.id: [] for x in xs}
        for i, y in enumerate(ys):
            answers[y.id] = [xs[i + 1], ys[i + 1]] if i + 1 < len(xs) else []
        proto = Scripted(answers)
        for x, y in zip(xs, ys, strict=True):      # y answers once x has answered
            proto.gates[y.id] = asyncio.Event()
            proto.on_answer[x.id] = [proto.gates[y.id]]
        crawl = StoreLookup(proto, TARGET, [xs[0], ys[0]], width=2,  # type: ignore[arg-type]
                            alpha=2, record=b"rec", max_extra=2)
        final, stored = await crawl.store()
        assert [n.id for n in final] == [xs[-1].id, ys[-1].id] and stored == 2
        # without the bound all seven x would have been stored while the crawl ran
        assert crawl.early == 4 and proto.stored[:4] == [x.id for x in xs[:4]]
        assert sorted(proto.stored[4:]) == sorted([xs[-1].id, ys[-1].id])
        assert crawl.wasted == 4

    run_uvloop(scenario())


def test_tokens_are_fetched_once_and_only_for_window_nodes_without_one():
    """A (token held) and B (none) are the 2 closest at first; E (far, no token) is
    asked too but never among the 2 closest. A's answer brings C and D, closer; B's and
    C's answers repeat D. Every window node without a token is sent one ``identify``,
    once, even though no answer ever teaches the token (the scripted fetch never
    ends, as to an old agent) and the window is rescanned after each answer; A (token
    held) and E (outside) never. The stores never waited for those fetches."""
    a, b, c, d, e = (peer(0x40, 1), peer(0x41, 2), peer(0x01, 3), peer(0x02, 4),
                     peer(0xF0, 5))

    async def scenario() -> None:
        proto = Scripted({a.id: [c, d], b.id: [d], c.id: [d], d.id: [], e.id: []})
        proto.tokens = {a.id}
        crawl = StoreLookup(proto, TARGET, [a, b, e], width=2,  # type: ignore[arg-type]
                            alpha=3, record=b"rec")
        final, stored = await crawl.store()
        assert [n.id for n in final] == [c.id, d.id] and stored == 2
        assert sorted(proto.fetched) == sorted([b.id, c.id, d.id]), proto.fetched
        assert crawl.prefetched == {b.id, c.id, d.id}
        assert e.id not in proto.fetched
        assert len(crawl._fetching) == 3               # all still pending, not awaited
        proto.never.set()
        await asyncio.wait_for(asyncio.gather(*crawl._fetching), timeout=5)

    run_uvloop(scenario())


def _record(node: DHTNode) -> WorkerRecord:
    return WorkerRecord.create(node.identity, name="w", services=["ocr"],
                               endpoint="http://127.0.0.1:9", gpu="T4", gpu_memory_gb=16,
                               load=0.0, capacity=4, region="", ttl=300)


def _old(node: DHTNode) -> None:
    """An agent from before ``identify`` (0.2.0): it drops the unknown RPC unanswered."""
    assert node.protocol is not None
    node.protocol.engine.handlers.pop("identify")


def test_a_fetched_token_makes_the_store_go_through_without_a_challenge():
    """Real nodes on loopback: A forgets B's token (as a joiner holds none for a far
    key's closest nodes). ``fetch_token`` (the store lookup's prefetch) teaches it
    again, and A's announce to B is accepted with no challenge: B counts no
    token-less announce."""
    async def scenario() -> None:
        a, b = DHTNode(Identity.generate()), DHTNode(Identity.generate())
        for n in (a, b):
            await n.listen(0, "127.0.0.1")
        try:
            assert await a.bootstrap([("127.0.0.1", b.port)]) == 1
            assert a.protocol is not None and b.protocol is not None
            bnode = Node(b.node.id, "127.0.0.1", b.port)
            a.protocol.calls.peer_tokens.drop(("127.0.0.1", b.port))
            assert not a.protocol.holds_token(bnode)
            assert await a.protocol.fetch_token(bnode)
            assert a.protocol.holds_token(bnode)
            before = b.protocol.drops["announce_no_token"]
            record = _record(a)
            assert await a.announce(record) >= 1
            assert b.protocol.drops["announce_no_token"] == before
            assert any(r.worker_id == record.worker_id
                       for r in b.protocol.storage.get(record.keys()[0]))
        finally:
            for n in (a, b):
                n.stop()

    run_uvloop(scenario())


def test_an_old_agent_without_identify_still_gets_the_record():
    """B drops ``identify`` (an old agent) and A holds no token of it: A's announce
    sends B the prefetch, which B never answers, and the store does not wait for it —
    B's challenge teaches the token, the repeated store is accepted, and B holds the
    record."""
    async def scenario() -> None:
        a, b = DHTNode(Identity.generate()), DHTNode(Identity.generate())
        for n in (a, b):
            await n.listen(0, "127.0.0.1")
        _old(b)
        try:
            assert await a.bootstrap([("127.0.0.1", b.port)]) == 1
            assert a.protocol is not None and b.protocol is not None
            bnode = Node(b.node.id, "127.0.0.1", b.port)
            assert not a.protocol.holds_token(bnode)   # ping answers carry none
            record = _record(a)
            assert await a.announce(record) >= 1
            assert a.stats()["token_prefetch"] >= 1
            assert b.protocol.drops["announce_no_token"] >= 1       # the challenge path
            assert any(r.worker_id == record.worker_id
                       for r in b.protocol.storage.get(record.keys()[0]))
            assert a.protocol.holds_token(bnode)              # taught by the challenge
        finally:
            for n in (a, b):
                n.stop()

    run_uvloop(scenario())
