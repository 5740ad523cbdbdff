"""The RPC engine's bounds: a bounded wait queue that fails fast (through the guard's
per-peer queueing, which is what ``RMAProtocol._call`` runs)."""

from __future__ import annotations

import asyncio
import socket

from agent.dht.identity import Identity
from agent.dht.rpc import QUEUE_FULL
from agent.dht.server import DHTNode
from tests.util import free_port, run_uvloop


def test_wait_queue_is_bounded_and_its_refusals_are_not_held_against_the_peer():
    async def scenario() -> None:
        node = DHTNode(Identity.generate())
        await node.listen(0, "127.0.0.1")
        proto = node.protocol
        proto.calls.per_peer_inflight = 2                 # 2 on the wire to one address ...
        proto.calls.max_queued = 3                        # ... 3 waiting, the rest refused
        silent = ("127.0.0.1", free_port(socket.SOCK_DGRAM))  # nobody answers there
        try:
            calls = [asyncio.ensure_future(proto.call(silent, "ping", proto.my_id(),
                                                       timeout=0.3))
                     for _ in range(8)]
            await asyncio.sleep(0.05)
            done = [c for c in calls if c.done()]
            assert len(done) == 3 and all(c.result() == (False, QUEUE_FULL) for c in done)
            assert proto.failed["queue_full"] == 3
            results = await asyncio.gather(*calls)
            assert sum(1 for r in results if r == (False, None)) == 5   # real timeouts
            # a refusal is our backlog: handle_call_response does not count it
            from kademlia.node import Node
            peer = Node(bytes(20), *silent)
            proto.handle_call_response((False, QUEUE_FULL), peer)
            assert not proto.is_suspect(peer.id)
        finally:
            node.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())
