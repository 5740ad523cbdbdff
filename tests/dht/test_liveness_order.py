"""Suspects (contacts with an unanswered failure) are neither handed out nor asked first,
while the removal rule keeps them in the table (deterministic: a fake clock, a fake
``call``, no sockets, no sleeps)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from kademlia.node import Node

from agent.dht.liveness import SUSPECT_TTL, ContactLiveness
from agent.dht.routing import RoutingTable
from tests.util import tasks_ended


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProtocol:
    """What kademlia's bucket-full path calls on the table's protocol."""

    async def call_ping(self, node: Node) -> None:
        return None


def make(clock: Clock, contacts: int = 40) -> tuple[ContactLiveness, list[Node]]:
    """A liveness over a real routing table of ``contacts`` contacts; every request
    fails (``call``), probes are spawned and never run (``spawn`` closes them)."""
    me = Node(os.urandom(20))
    table = RoutingTable(FakeProtocol(), 20, me)
    nodes = [Node(os.urandom(20), "127.0.0.2", 4000 + i) for i in range(contacts)]
    for n in nodes:
        table.add_contact(n)

    async def call(*_a: Any, **_k: Any) -> tuple[bool, Any]:
        return (False, None)

    def spawn(coro: Any) -> None:
        coro.close()

    live = ContactLiveness(table, storage=None, source_node=me, ksize=20, call=call,
                           my_id=lambda: me.id, spawn=spawn, serving=lambda: False,
                           drops=Counter(), clock=clock)
    return live, [n for n in nodes if n in table]


def test_a_suspect_is_not_handed_out_and_the_answer_stays_full():
    clock = Clock()
    live, _nodes = make(clock)
    target = Node(os.urandom(20))
    before = live.live_neighbors(target, 20)
    assert [n.id for n in before] == [n.id for n in live.router.find_neighbors(target, k=20)]
    nearest = before[0]
    live.handle_call_response((False, None), nearest)   # one lost request
    assert live.is_suspect(nearest.id) and nearest in live.router   # the rule keeps it
    after = live.live_neighbors(target, 20)
    assert nearest.id not in {n.id for n in after}
    assert len(after) == 20                               # the next one moves up
    assert [n.id for n in after[:19]] == [n.id for n in before[1:20]]
    # an answer from it clears the failure: named again
    live.handle_call_response((True, nearest.id), nearest)
    assert live.live_neighbors(target, 20)[0].id == nearest.id


def test_a_suspect_is_named_again_once_its_failure_is_old():
    clock = Clock()
    live, _nodes = make(clock)
    target = Node(os.urandom(20))
    nearest = live.live_neighbors(target, 1)[0]
    live.handle_call_response((False, None), nearest)
    assert live.live_neighbors(target, 1)[0].id != nearest.id
    clock.now += SUSPECT_TTL + 1
    assert live.live_neighbors(target, 1)[0].id == nearest.id


def test_a_node_whose_contacts_all_failed_names_none_but_its_lookups_still_start():
    """Answers name nobody who failed; a lookup of the node itself falls back to its
    nearest contacts (a node cut off for a while must still try them)."""
    from agent.dht.identity import Identity
    from agent.dht.server import DHTNode

    async def scenario() -> None:
        clock = Clock()
        live, nodes = make(clock, contacts=5)
        for n in nodes:
            live.handle_call_response((False, None), n)
        assert live.live_neighbors(Node(os.urandom(20)), 20) == []
        node = DHTNode(Identity.generate())

        class Proto:
            liveness = live
            router = live.router

        node.protocol = Proto()  # type: ignore[assignment]
        assert len(node._start_peers(os.urandom(20))) == len(nodes)

    asyncio.run(scenario())


def test_a_store_set_lookup_waits_for_a_silent_closer_node_only_until_its_rto():
    """A patient lookup (the k closest, for a store set) waits for a slow node closer
    than its last answer — but not through the retransmission of a request that got no
    answer within the peer's RTO (a dead node cost every such lookup ~4 s on a WAN): it
    ends while that request is still out, before it counts as lost."""
    from tests.dht.test_lookup_wan import HeldReplies
    from tests.dht.test_network import build, stop_all
    from tests.util import run_uvloop

    async def scenario() -> None:
        nodes = await build(10)
        asker = nodes[0]
        asker.protocol.engine.rto_min = 0.3         # its retransmission comes 0.3 s late
        try:
            silent = nodes[5]
            target = bytes([silent.node.id[0] ^ 0x01]) + silent.node.id[1:]
            tap = silent.protocol.transport = HeldReplies(silent.protocol.transport,
                                                          ("127.0.0.1", asker.port))
            lost = asker.protocol.engine.lost
            found = await asker._node_lookup(target, width=4)
            assert tap.held, "the silent node was asked"
            assert silent.node.id not in {n.id for n in found} and len(found) == 4
            # it did not wait for the retransmission's verdict
            assert asker.protocol.engine.lost == lost
            assert asker.protocol.engine.outstanding >= 1
            tap.release()
        finally:
            stop_all(nodes)
            await tasks_ended()

    run_uvloop(scenario())


def test_retransmitting_names_a_peer_that_missed_its_rto_until_its_verdict():
    """``RpcEngine.retransmitting``: False while the first copy is within its RTO, True
    once the engine sent it again, False after the answer or the lost verdict."""
    from tests.dht.test_rtt import Lossy, _pair
    from tests.util import run_uvloop, wait_for_async

    async def scenario() -> None:
        a, b = await _pair(rto_initial=0.2)
        addr_b = ("127.0.0.1", b.port)
        eng = a.protocol.engine
        try:
            tap = a.protocol.transport = Lossy(a.protocol.transport, lambda n: n == 1)
            call = asyncio.ensure_future(a.protocol.call(addr_b, "ping", a.protocol.my_id()))
            await wait_for_async(lambda: len(tap.sent) == 1, what="the first copy")
            assert not eng.retransmitting(addr_b)
            await wait_for_async(lambda: len(tap.sent) == 2 or call.done(),
                                 what="the retransmission")
            assert (await call)[0] and not eng.retransmitting(addr_b)   # answered
            tap.drop = lambda n: True
            call = asyncio.ensure_future(a.protocol.call(addr_b, "ping", a.protocol.my_id()))
            await wait_for_async(lambda: len(tap.sent) == 4, what="sent again")
            assert eng.retransmitting(addr_b) and not call.done()
            assert (await call)[0] is False and not eng.retransmitting(addr_b)   # lost
        finally:
            a.stop()
            b.stop()
            await tasks_ended()

    run_uvloop(scenario())
