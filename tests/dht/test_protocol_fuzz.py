"""Fuzz the datagram handler: nothing a peer sends may raise or kill the node.

Runs a real RMAProtocol on a uvloop loop bound to 127.0.0.1 and feeds it >= 10k hostile
datagrams (random bytes, random msgpack, valid envelopes with wrong arity/types, unknown
RPCs, oversized, stray responses). A loop exception handler records anything that escapes
into a task; the test fails if it saw anything, and checks the drop counters moved.

Every test has its own node (a function-scoped harness, shared only by the examples of
that one test) and asserts only on what it fed itself: each passes alone (``-k``) and the
file passes in any order.
"""

from __future__ import annotations

import asyncio
import os
import random

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dht.identity import Identity
from agent.dht.protocol import MAX_DATAGRAM
from agent.dht.record import WorkerRecord, service_key
from agent.dht.server import DHTNode

ADDR = ("127.0.0.1", 9)  # discard port: replies and ping-backs go nowhere


class Harness:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.escaped: list[dict] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.escaped.append(ctx))
        self.node = DHTNode(Identity.generate())
        self.loop.run_until_complete(self.node.listen(0, "127.0.0.1"))
        self.proto = self.node.protocol
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.proto.engine.datagram_received(data, ADDR)
        self.fed += 1
        if self.fed % 16 == 0:  # let spawned handler tasks run (and fail, if they would)
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        self.node.stop()
        self.loop.run_until_complete(asyncio.sleep(0.01))
        self.loop.close()


@pytest.fixture
def harness():
    """A fresh fuzzed node per test (hypothesis runs all of a test's examples on it)."""
    h = Harness()
    yield h
    h.close()
    assert not h.escaped, h.escaped[:3]


def _req(name, args, msg_id: bytes | None = None) -> bytes:
    return b"\x00" + (msg_id or os.urandom(20)) + msgpack.packb([name, args], use_bin_type=True)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
RPC_NAMES = ["ping", "store", "find_node", "find_value", "announce", "find_providers",
             "reachable", "stun", "nope", "__init__", "_call", "rpc_ping", ""]
# examples per fuzz test: 1,000 in the suite (about 30 s in all); a deeper run sets
# RMA_FUZZ_EXAMPLES (e.g. 20000) — each run draws new inputs either way
EXAMPLES = int(os.environ.get("RMA_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(harness, data):
    harness.feed(data)
    harness.feed(b"\x00" + data)
    harness.feed(b"\x01" + data)
    assert not harness.escaped


@FUZZ
@given(st.sampled_from([b"\x00", b"\x01", b"\x02"]), msgpack_values)
def test_random_msgpack(harness, kind, value):
    harness.feed(kind + os.urandom(20) + msgpack.packb(value, use_bin_type=True))
    assert not harness.escaped


@FUZZ
@given(st.sampled_from(RPC_NAMES), st.lists(msgpack_values, max_size=5))
def test_envelopes_with_wrong_args(harness, name, args):
    harness.feed(_req(name, args))
    # same RPC with a plausible node id first: reaches the per-argument checks
    harness.feed(_req(name, [os.urandom(20), *args]))
    harness.feed(_req(name, [b"", *args[:3]]))
    assert not harness.escaped


@FUZZ
@given(st.sampled_from(["announce", "find_providers", "find_node", "reachable"]),
       st.binary(min_size=20, max_size=20), st.binary(max_size=400), st.integers(-5, 70000))
def test_typed_but_hostile_args(harness, name, key, blob, port):
    arity = {"announce": [os.urandom(20), key, blob], "find_providers": [os.urandom(20), key],
             "find_node": [os.urandom(20), key], "reachable": [os.urandom(20), port]}
    harness.feed(_req(name, arity[name]))
    assert not harness.escaped


def test_oversized_and_short_and_structural(harness):
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    before = dict(harness.proto.drops)
    harness.feed(b"\x00" + os.urandom(20) + b"\x00" * MAX_DATAGRAM)
    harness.feed(b"")
    harness.feed(b"\x00" * 5)
    # deeply nested array (msgpack stack limit) and a huge declared length
    harness.feed(b"\x00" + os.urandom(20) + b"\x91" * 5000)
    harness.feed(b"\x00" + os.urandom(20) + b"\xdd\xff\xff\xff\xff")
    harness.feed(b"\x00" + os.urandom(20) + b"\xc7\x05\x01abcde")  # ext type
    harness.feed(b"\x01" + os.urandom(20) + msgpack.packb({"records": [b"x"]}))
    d = harness.proto.drops
    assert d["oversized"] > before.get("oversized", 0)
    assert d["short"] > before.get("short", 0)
    assert d["malformed"] > before.get("malformed", 0)
    assert d["unknown_msgid"] > before.get("unknown_msgid", 0)
    assert not harness.escaped


def _hostile() -> list[tuple[str, bytes]]:
    """One datagram per drop reason a request or reply can be refused for."""
    def raw(kind: bytes, value: object) -> bytes:
        return kind + os.urandom(20) + msgpack.packb(value, use_bin_type=True)
    return [
        ("malformed", b"\x00" + os.urandom(20) + b"\xc1"),   # 0xc1: never used by msgpack
        ("bad_envelope", raw(b"\x00", {"find_node": 1})),
        ("unknown_rpc", _req("nope", [os.urandom(20)])),
        ("bad_arity", _req("ping", [])),
        ("bad_nodeid", _req("ping", [b"short"])),
        ("bad_args", _req("find_node", [os.urandom(20), 5])),
        ("unknown_msgid", raw(b"\x01", {"records": [b"x"]})),
    ]


def test_counters_moved_and_node_still_answers(harness):
    """After a burst of hostile datagrams (its own: a catalogue of one per drop reason,
    then seeded random ones), each reason's counter moved, and the node still answers a
    well-formed request over real UDP."""
    d = harness.proto.drops
    for reason, datagram in _hostile():
        before = d[reason]
        harness.feed(datagram)
        assert d[reason] == before + 1, (reason, dict(d))
    rnd = random.Random(0x5eed)
    for _ in range(1000):
        harness.feed(rnd.choice([b"\x00", b"\x01", b""]) + rnd.randbytes(rnd.randrange(300)))
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    assert not harness.escaped
    # a real record announced through the fuzzed node is still accepted
    ident = Identity.generate()
    rec = WorkerRecord.create(ident, name="w", services=("ocr",), endpoint="https://x", gpu="",
                              gpu_memory_gb=0, load=0, capacity=1, region="", ttl=60)
    other = DHTNode(Identity.generate(), mode="client")
    loop = harness.loop

    async def check():
        await other.listen(0, "127.0.0.1")
        try:
            assert await other.bootstrap([("127.0.0.1", harness.node.port)]) == 1
            assert await other.announce(rec) >= 1
            found = await other.find_providers("ocr")
            assert [r.worker_id for r in found] == [ident.node_id]
        finally:
            other.stop()

    loop.run_until_complete(check())
    assert harness.node.storage.count(service_key("ocr")) == 1
    assert not harness.escaped
