"""Contact liveness: the removal rule (several lost requests spread over time, never one
lost datagram), and a removed contact brought back when it answers (a false death)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from tests.util import run_uvloop, wait_for_async


class Lossy:
    """A node's transport on a lossy link: each datagram (requests and replies) is dropped
    with probability ``loss`` (seeded), and all of them while ``burst`` is on."""

    def __init__(self, transport: Any, loss: float, seed: int) -> None:
        self._t = transport
        self.loss = loss
        self.rng = random.Random(seed)
        self.burst = False
        self.dropped = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.burst or self.rng.random() < self.loss:
            self.dropped += 1
            return
        self._t.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def test_a_lossy_contact_stays_and_a_dead_one_leaves_after_the_rules_spread():
    """One datagram in ten lost both ways, plus a burst that loses every datagram for a
    while (three requests in a row lost, retransmissions included: the old rule, two
    misses, removed the contact there): the contact stays. Then it dies: it leaves only
    after three lost requests whose first and last are ``dead_span`` apart."""
    async def scenario() -> None:
        span = 1.0
        a = DHTNode(Identity.generate(), rto_min=0.05, rto_initial=0.1, dead_span=span)
        b = DHTNode(Identity.generate())
        await a.listen(0, "127.0.0.1")
        await b.listen(0, "127.0.0.1")
        try:
            assert await a.bootstrap([("127.0.0.1", b.port)]) == 1
            contact = a.protocol.router.all_contacts()[0]
            la = a.protocol.transport = Lossy(a.protocol.transport, 0.1, seed=1)
            lb = b.protocol.transport = Lossy(b.protocol.transport, 0.1, seed=2)
            loop = asyncio.get_running_loop()

            la.burst = True                     # a burst: nothing gets through
            assert (await a.protocol.call_ping(contact))[0] is False
            first_loss = loop.time()
            # the probes that follow the miss are lost too, until the rule's count is
            # reached; the last probe then waits for the span, and the burst is over
            await wait_for_async(lambda: a.stats()["lost_requests"] >= 3,
                                 what="three lost requests in the burst")
            la.burst = False
            assert contact in a.protocol.router and a.protocol.is_suspect(contact.id)
            await wait_for_async(lambda: not a.protocol.is_suspect(contact.id),
                                 timeout=20, what="the delayed probe answered")
            assert loop.time() - first_loss >= span * 0.99

            for _ in range(200):                # 10 % loss each way, sequential pings
                await a.protocol.call_ping(contact)
            st = a.stats()
            assert contact in a.protocol.router
            assert st["removed_contacts"] == 0 and st["retransmissions"] > 10
            assert la.dropped + lb.dropped > 20

            lost_before = st["lost_requests"]
            b.stop()                            # now it is dead
            assert (await a.protocol.call_ping(contact))[0] is False
            first_loss = loop.time()
            await wait_for_async(lambda: contact not in a.protocol.router, timeout=20,
                                 what="the dead contact removed")
            assert loop.time() - first_loss >= span * 0.99
            st = a.stats()
            assert st["removed_contacts"] == 1 and st["graveyard"] == 1
            assert st["lost_requests"] - lost_before >= 3
        finally:
            a.stop()
            b.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_a_contact_lost_to_silence_is_revived_when_it_answers_again():
    """What heals a partition: b goes silent, a removes it by the rule and keeps it in its
    graveyard; when b answers again (same id, same address) a's revival pings bring it
    back into the routing table without any restart or new bootstrap — and it counts as
    a false death (removed, yet alive within the window)."""
    async def scenario() -> None:
        ident_b = Identity.generate()
        a = DHTNode(Identity.generate(), revive_interval=0.2, dead_span=0.5)
        b = DHTNode(ident_b)
        await a.listen(0, "127.0.0.1")
        await b.listen(0, "127.0.0.1")
        port_b = b.port
        try:
            assert await a.bootstrap([("127.0.0.1", port_b)]) == 1
            contact = a.protocol.router.all_contacts()[0]
            b.stop()
            await a.protocol.call_ping(contact)     # one miss: probes follow, then removal
            await wait_for_async(lambda: a.peers() == 0, timeout=20, what="b removed")
            assert a.stats()["graveyard"] == 1 and a.stats()["false_deaths"] == 0
            await asyncio.sleep(2.5)                # revival pings fail meanwhile
            assert a.peers() == 0
            b2 = DHTNode(ident_b)
            await b2.listen(port_b, "127.0.0.1")     # b is back
            try:
                await wait_for_async(lambda: a.peers() == 1, timeout=15, what="b revived")
                st = a.stats()
                assert st["revived"] == 1 and st["graveyard"] == 0
                assert st["false_deaths"] == 1
            finally:
                b2.stop()
        finally:
            a.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())
