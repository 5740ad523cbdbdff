"""The ``identify`` answer carries the asker's write token (``handlers.rpc_identify``), and
still fits the anti-amplification budget of an address that has not proven itself
(``flood_gate.RequestGate``'s ``amplification``, kept by ``tokens.AddressBudget``).

Why it matters: every contact is verified by ``identify`` before it enters a routing
table, so this is the first answer a newcomer gets from each node. Were it over the
budget, the gate would turn it into a token challenge: verification would cost one more
round trip per contact, and the token riding along would save nothing. Two real nodes on
loopback, treated like any address (``RMA_AGENT_DHT_LOOPBACK=strict``), real datagrams
measured on the wire.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from agent.dht.diversity import LOOPBACK_ENV
from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from agent.dht.wire import HEADER
from tests.util import run_uvloop, tasks_ended

REQUEST, REPLY = b"\x00", b"\x01"


class Datagrams:
    """A node's transport that keeps a copy of every datagram it sends."""

    def __init__(self, transport: Any) -> None:
        self._t = transport
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))
        self._t.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def test_identify_answer_with_token_fits_an_unproven_askers_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOPBACK_ENV, "strict")

    async def scenario() -> None:
        asker, answerer = DHTNode(Identity.generate()), DHTNode(Identity.generate())
        await asker.listen(0, "127.0.0.1")
        await answerer.listen(0, "127.0.0.1")
        try:
            out = asker.protocol.transport = Datagrams(asker.protocol.transport)
            back = answerer.protocol.transport = Datagrams(answerer.protocol.transport)
            gate = answerer.protocol.gate
            asker_addr, answerer_addr = ("127.0.0.1", asker.port), ("127.0.0.1", answerer.port)
            assert not gate.is_proven(asker_addr)      # strict: loopback is budgeted

            nid = await asker.protocol.liveness.identify(answerer_addr)
            assert nid == answerer.identity.node_id

            request = next(d for d in out.sent if d[:1] == REQUEST)
            assert msgpack.unpackb(request[HEADER:])[0] == "identify"
            answer = next(d for d in back.sent
                          if d[:1] == REPLY and d[1:HEADER] == request[1:HEADER])
            body = msgpack.unpackb(answer[HEADER:], raw=False)
            # the first answer is the whole one (key, signature and the asker's token),
            # not the token challenge an over-budget answer is turned into
            assert {"key", "sig", "token"} <= set(body), body
            assert gate.drops["reply_needs_token"] == gate.drops["reply_amplification"] == 0
            budget = gate.budget.factor * len(request)
            assert len(answer) <= budget, (len(answer), len(request), gate.budget.factor)
            print(f"identify: request {len(request)} B, answer {len(answer)} B, "
                  f"budget {budget:.0f} B")
            # and the token did its job: the asker holds it for its first announce
            assert asker.protocol.calls.peer_tokens.get(answerer_addr) == body["token"]
        finally:
            asker.stop()
            answerer.stop()
            await tasks_ended()

    run_uvloop(scenario())
