"""How a split heals fast and stays bounded: the graveyard's heal mode (one revival makes
every removed contact due at once, a few more pings per tick for a while, not re-armed at
every revival) and the recheck of suspect contacts when a revival shows a heal
(deterministic: fake clock, fake ``call``, no sockets, no sleeps)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from kademlia.node import Node

from agent.dht.graveyard import (
    HEAL_PER_TICK,
    HEAL_WINDOW,
    REVIVE_MIN,
    REVIVE_PER_TICK,
    Graveyard,
)
from agent.dht.liveness import ContactLiveness
from agent.dht.routing import RoutingTable
from tests.dht.test_liveness_order import Clock, FakeProtocol
from tests.util import run_uvloop, wait_for_async


def test_heal_mode_makes_every_entry_due_and_is_bounded():
    clock = Clock()
    yard = Graveyard(clock=clock)
    nodes = [Node(os.urandom(20), "127.0.0.2", 5000 + i) for i in range(40)]
    for n in nodes:
        yard.bury(n)
    assert yard.due(set()) == []                       # nobody is due before REVIVE_MIN
    clock.now += REVIVE_MIN
    assert len(yard.due(set())) == REVIVE_PER_TICK     # the steady trickle
    assert yard.wake()                                 # a revival: heal mode
    first = yard.due(set())
    assert len(first) == HEAL_PER_TICK
    # every entry was made due, so the next tick takes the next ones, not the same
    assert {n.id for n in yard.due(set())}.isdisjoint({n.id for n in first})
    assert not yard.wake()                             # not re-armed within the window
    clock.now += HEAL_WINDOW
    assert len(yard.due(set())) == REVIVE_PER_TICK     # the window is over
    assert not yard.wake()                             # ... and a quiet one must follow
    clock.now += HEAL_WINDOW
    assert yard.wake()
    # a busy entry (a ping already out) is never named twice
    busy = {n.id for n in nodes[:39]}
    assert [n.id for n in yard.due(busy)] == [nodes[39].id]


async def stop(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel what is still waiting (a probe sleeping out the removal span)."""
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*list(tasks), return_exceptions=True)


def test_a_revival_rechecks_suspect_contacts_at_once():
    """Contacts with an unanswered failure are skipped by lookups for SUSPECT_TTL. When a
    removed contact answers again (a heal), they are pinged at once: the ones that
    answer stop being suspects; the one still silent stays suspect (its removal rule
    goes on)."""
    async def scenario() -> None:
        clock = Clock()
        me = Node(os.urandom(20))
        table = RoutingTable(FakeProtocol(), 20, me)
        contacts = [Node(os.urandom(20), "127.0.0.2", 4000 + i) for i in range(6)]
        for n in contacts:
            table.add_contact(n)
        back = Node(os.urandom(20), "127.0.0.3", 4100)
        silent = contacts[5]
        by_addr = {(n.ip, n.port): n.id for n in [*contacts, back]}
        pinged: list[tuple[str, int]] = []
        split = [True]
        tasks: set[asyncio.Task[Any]] = set()

        async def call(addr: tuple[str, int], name: str, *_a: Any) -> tuple[bool, Any]:
            pinged.append(addr)
            if split[0] or addr == (silent.ip, silent.port):
                return (False, None)
            return (True, by_addr[addr])

        def spawn(coro: Any) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        live = ContactLiveness(table, storage=None, source_node=me, ksize=20, call=call,
                               my_id=lambda: me.id, spawn=spawn, serving=lambda: False,
                               drops=Counter(), clock=clock, dead_after=3, dead_span=1e6)
        for n in contacts[3:]:
            live.handle_call_response((False, None), n)      # lost: probes follow
        # the probes fail too, until the rule's last probe waits out the (long) span
        await wait_for_async(lambda: all(live._fails[n.id][0] >= 3 for n in contacts[3:]),
                             what="three losses each")
        await stop(tasks)
        suspects = [n for n in contacts if live.is_suspect(n.id)]
        assert [n.id for n in suspects] == [n.id for n in contacts[3:]]
        live.declare_dead(back)                               # removed earlier
        split[0] = False                                      # the split heals
        pinged.clear()
        await live._revive(back)                              # its revival ping answers
        await wait_for_async(lambda: not live.is_suspect(contacts[3].id)
                             and not live.is_suspect(contacts[4].id), what="rechecked")
        await stop(tasks)
        assert back in table and live.stats()["heal_wakes"] == 1
        assert {(n.ip, n.port) for n in contacts[3:]} <= set(pinged)   # rechecked
        assert not live.is_suspect(contacts[3].id) and not live.is_suspect(contacts[4].id)
        assert live.is_suspect(silent.id) and silent in table

    run_uvloop(scenario())
