"""Per-peer RTT estimation (RFC 6298 arithmetic, Karn's rule) and the bounded
retransmission of a request, over real UDP with a lossy transport in between."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from agent.dht.identity import Identity
from agent.dht.rtt import GRANULARITY, MAX_BACKOFF, RttEstimator
from agent.dht.server import DHTNode
from tests.util import run_uvloop


def test_rfc6298_arithmetic():
    e = RttEstimator()
    assert e.srtt is None and e.rto(0.2, 2.0, 1.0) == 1.0     # unknown peer: initial
    e.sample(0.100)                                            # first sample: R, R/2
    assert e.srtt == pytest.approx(0.100) and e.rttvar == pytest.approx(0.050)
    assert e.rto(0.0, 10.0, 1.0) == pytest.approx(0.100 + 4 * 0.050)
    e.sample(0.300)                                            # RTTVAR first, old SRTT
    assert e.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * abs(0.100 - 0.300))
    assert e.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.300)
    assert e.rto(0.0, 10.0, 1.0) == pytest.approx(e.srtt + 4 * e.rttvar)


def test_granularity_floor_and_clamps():
    e = RttEstimator()
    for _ in range(200):
        e.sample(0.050)                 # a perfectly steady path: RTTVAR -> 0
    assert e.base(1.0) == pytest.approx(0.050 + GRANULARITY, abs=1e-6)
    assert e.rto(0.2, 2.0, 1.0) == 0.2  # the floor
    for _ in range(50):
        e.sample(5.0)
    assert e.rto(0.2, 2.0, 1.0) == 2.0  # the ceiling


def test_backoff_doubles_to_the_ceiling_and_a_sample_resets_it():
    e = RttEstimator()
    e.sample(0.1)
    first = e.rto(0.2, 60.0, 1.0)
    e.timed_out()
    assert e.rto(0.2, 60.0, 1.0) == pytest.approx(2 * first)
    e.timed_out()
    assert e.rto(0.2, 60.0, 1.0) == pytest.approx(4 * first)
    for _ in range(20):
        e.timed_out()
    assert e.backoff == MAX_BACKOFF and e.rto(0.2, 2.0, 1.0) == 2.0
    e.sample(0.1)
    assert e.backoff == 1.0


class Lossy:
    """A node's transport: drops the requests ``drop(n)`` says (n counts requests sent),
    and remembers when each request datagram left."""

    def __init__(self, transport: Any, drop: Any) -> None:
        self._t = transport
        self.drop = drop
        self.sent: list[float] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if data[:1] == b"\x00":                    # a request (replies go through)
            self.sent.append(asyncio.get_running_loop().time())
            if self.drop(len(self.sent)):
                return
        self._t.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


async def _pair(rto_initial: float = 0.3) -> tuple[DHTNode, DHTNode]:
    # a client: its requests carry no node id, so b does not check a back (the taps
    # count a's requests to b and nothing else)
    a = DHTNode(Identity.generate(), rto_initial=rto_initial, mode="client")
    b = DHTNode(Identity.generate())
    await a.listen(0, "127.0.0.1")
    await b.listen(0, "127.0.0.1")
    return a, b


def test_a_dropped_request_is_answered_through_its_retransmission_and_not_sampled():
    """The first datagram is lost: the same request id goes out again after the RTO and
    its answer completes the call — not a lost request, and (Karn) no RTT sample: the
    reply could answer either copy."""
    async def scenario() -> None:
        a, b = await _pair()
        tap = a.protocol.transport = Lossy(a.protocol.transport, lambda n: n == 1)
        addr_b = ("127.0.0.1", b.port)
        try:
            ok, res = await a.protocol.call(addr_b, "ping", a.protocol.my_id())
            assert ok and res == b.node.id
            eng = a.protocol.engine
            assert eng.retransmissions == 1 and eng.lost == 0
            assert len(tap.sent) == 2 and tap.sent[1] - tap.sent[0] >= 0.3 * 0.99
            assert eng.peer_srtt(addr_b) is None and eng.srtt is None   # Karn
            ok, _ = await a.protocol.call(addr_b, "ping", a.protocol.my_id())     # sent once
            assert ok and eng.peer_srtt(addr_b) is not None
        finally:
            a.stop()
            b.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_a_request_is_lost_only_after_its_bounded_retransmission():
    """Every datagram dropped: exactly two copies go out (one retransmission), the
    second timer twice the first, and only then the call fails and counts as lost; the
    peer's RTO is backed off."""
    async def scenario() -> None:
        a, b = await _pair(rto_initial=0.2)
        tap = a.protocol.transport = Lossy(a.protocol.transport, lambda n: True)
        addr_b = ("127.0.0.1", b.port)
        eng = a.protocol.engine
        try:
            t0 = asyncio.get_running_loop().time()
            assert await a.protocol.call(addr_b, "ping", a.protocol.my_id()) == (False, None)
            t1 = asyncio.get_running_loop().time()
            assert len(tap.sent) == 2
            assert eng.retransmissions == 1 and eng.lost == 1
            assert sum(eng.timeouts.values()) == 1
            # the first copy waited one RTO, the second twice that (lower bounds only)
            assert tap.sent[1] - tap.sent[0] >= 0.2 * 0.99
            assert t1 - t0 >= 3 * 0.2 * 0.99
            # a peer with an estimate gets its RTO doubled by the loss
            tap.drop = lambda n: False
            assert (await a.protocol.call(addr_b, "ping", a.protocol.my_id()))[0]
            before = eng.rto(addr_b)
            tap.drop = lambda n: True
            assert (await a.protocol.call(addr_b, "ping", a.protocol.my_id()))[0] is False
            assert math.isclose(eng.rto(addr_b), min(eng.rto_max, 2 * before))
        finally:
            a.stop()
            b.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())
