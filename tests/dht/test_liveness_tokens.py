"""Contact verification keeps an old agent's write token.

``ContactLiveness.identify`` asks ``identify`` first; an old agent drops that unknown RPC
unanswered and is then checked by ``ping`` (a legacy contact). The failed ``identify``
says nothing about the peer's tokens, so — as on the store path (``fetch_token``,
``CallQueue.call(forget=False)``) — a token learned from it earlier (through a challenge)
must stay: otherwise the next store to it pays the challenge round trip again.
Real UDP: a real node verifies a port that speaks the node wire like a 0.2.0 agent
(``hostile.AttackerHost``: answers ``ping`` with its id, drops ``identify``).
"""

from __future__ import annotations

import os

from kademlia.node import Node

from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from agent.dht.tokens import TOKEN_LEN
from tests.dht.hostile import AttackerHost
from tests.util import run_uvloop, tasks_ended


def test_a_failed_identify_keeps_a_learned_write_token():
    async def scenario() -> None:
        node = DHTNode(Identity.generate())
        await node.listen(0, "127.0.0.1")
        old = await AttackerHost("127.0.0.1", [os.urandom(20)],
                                 advertise_siblings=False).start()
        try:
            addr = old.addrs[0]
            token = os.urandom(TOKEN_LEN)
            node.protocol.calls.peer_tokens.put(addr, token)   # from an earlier challenge
            nid = await node.protocol.liveness.identify(addr, timeout=0.5)
            assert nid == old.ids[0]                        # admitted by ping (legacy)
            assert old.requests.get("identify") == 1        # asked first, dropped
            assert node.protocol.holds_token(Node(nid, *addr))
            assert node.protocol.calls.peer_tokens.get(addr) == token
        finally:
            old.close()
            node.stop()
            await tasks_ended()

    run_uvloop(scenario())
