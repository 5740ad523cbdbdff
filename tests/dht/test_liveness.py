"""Contact liveness: a removed contact is remembered and brought back when it answers."""

from __future__ import annotations

import asyncio

from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from tests.util import run_uvloop


def test_a_contact_lost_to_silence_is_revived_when_it_answers_again():
    """What heals a partition: b goes silent, a evicts it after two misses and keeps it
    in its graveyard; when b answers again (same id, same address) a's revival pings
    bring it back into the routing table without any restart or new bootstrap."""
    async def scenario() -> None:
        ident_b = Identity.generate()
        a = DHTNode(Identity.generate(), revive_interval=0.2)
        b = DHTNode(ident_b)
        await a.listen(0, "127.0.0.1")
        await b.listen(0, "127.0.0.1")
        port_b = b.port
        try:
            assert await a.bootstrap([("127.0.0.1", port_b)]) == 1
            contact = a.protocol.router.all_contacts()[0]
            b.stop()
            for _ in range(2):                      # two missed replies: evicted
                await a.protocol.call_ping(contact)
            assert a.peers() == 0 and a.stats()["graveyard"] == 1
            await asyncio.sleep(2.5)                # revival pings fail meanwhile
            assert a.peers() == 0
            b2 = DHTNode(ident_b)
            await b2.listen(port_b, "127.0.0.1")     # b is back
            try:
                for _ in range(150):
                    if a.peers() == 1:
                        break
                    await asyncio.sleep(0.1)
                st = a.stats()
                assert a.peers() == 1 and st["revived"] == 1 and st["graveyard"] == 0
            finally:
                b2.stop()
        finally:
            a.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())
