"""The wire: kademlia's RPCs made safe and fast, and aware of signed provider records.

``RMAProtocol`` is built by composition, one object per concern, each given what it
needs in its constructor:

* ``routing.RoutingTable`` — kademlia's buckets, with an exact neighbour search and the
  address-diversity limits;
* ``rpc.RpcEngine`` — the datagram endpoint: framing and validation (``wire``), pending
  calls, adaptive per-peer RTO, retransmission, the in-flight limit, the reply budget
  per source IP, C msgpack both ways. Nothing a peer sends raises; drops are counted;
* ``flood_gate.RequestGate`` — what a request from an address that has not proven
  itself may store or draw: write tokens (BEP 5 model) required by ``announce``, the
  2.5x anti-amplification budget;
* ``call_queue.CallQueue`` — our own requests: tokens sent and learned, per-peer and
  unproven-address limits, a bounded wait queue;
* ``liveness.ContactLiveness`` — contact verification, dead-contact eviction, suspects,
  revival after a partition, the bounded handoff to newcomers (no re-store storm);
* ``handlers.RpcHandlers`` — the answering side of every RPC;
* this module — the assembly and the ``call_*`` side of each RPC, which crawls and the
  node use.

rpcudp's datagram format is kept byte for byte, so the protocol still talks to plain
kademlia peers for ping/find_node and to older agents for everything.

Names other modules import from here (``MAX_PAYLOAD``, ``parse_nodes``, ``RttEstimator``,
...) are re-exported so callers need not know where the seams are.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from kademlia.node import Node

from agent.dht.call_queue import CallQueue
from agent.dht.flood_gate import PING_BYTES, RequestGate
from agent.dht.handlers import RpcHandlers
from agent.dht.liveness import (
    DEAD_AFTER,
    DEAD_SPAN,
    HANDOFF_KEYS,
    HANDOFF_RECORDS,
    SUSPECT_TTL,
    TOMBSTONE_WINDOW,
    ContactLiveness,
)
from agent.dht.routing import RoutingTable  # exact, contiguous-buffer neighbour search
from agent.dht.rpc import RpcEngine
from agent.dht.rtt import RttEstimator
from agent.dht.storage import ProviderStorage
from agent.dht.wire import (
    HEADER,
    MAX_DATAGRAM,
    MAX_NODES_IN_ANSWER,
    MAX_PAYLOAD,
    all_contacts,
    parse_nodes,
    probe_ping,
)
from agent.ratelimit import TokenBucket

__all__ = [
    "HANDOFF_KEYS", "HANDOFF_RECORDS", "HEADER", "MAX_DATAGRAM", "MAX_NODES_IN_ANSWER",
    "MAX_PAYLOAD", "PING_BYTES", "SUSPECT_TTL", "TOMBSTONE_WINDOW", "RMAProtocol",
    "RttEstimator", "all_contacts", "parse_nodes", "probe_ping",
]

Address = tuple[str, int]


class RMAProtocol:
    """Hardened kademlia protocol with provider-record RPCs (see module docstring).

    ``engine`` (the ``RpcEngine``) is what the UDP socket is bound to. ``on_revived``
    is called with a contact lost earlier that answers again (the node re-merges its
    neighbourhood through it). ``prove_id(nonce)``: our answer to ``identify`` (our key
    and a signature, ``Identity.node_id_proof``); ``require_keyed_ids``: refuse contacts
    that cannot prove their id (old agents), see ``liveness``."""

    def __init__(self, source_node: Node, storage: ProviderStorage, ksize: int, *,
                 mode: str = "server", rto_min: float = 0.2, rto_max: float = 2.0,
                 rto_initial: float = 1.0, dead_after: int = DEAD_AFTER,
                 dead_span: float = DEAD_SPAN, max_skew: float = 30.0,
                 handoff_rate: float = 20.0, reply_rate: float = 2_000_000.0,
                 max_inflight: int = 64, retransmits: int = 1,
                 on_revived: Callable[[Node], None] | None = None,
                 prove_id: Callable[[bytes], dict[str, bytes]] | None = None,
                 require_keyed_ids: bool = False) -> None:
        self.source_node = source_node
        self.storage = storage
        self.ksize = ksize
        self.mode = mode
        self.max_skew = max_skew
        self.drops: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.router = RoutingTable(self, ksize, source_node)
        limiter = TokenBucket(200.0, 400.0)   # contact verification and proof pings
        self.gate = RequestGate(drops=self.drops, limiter=limiter, spawn=self.spawn,
                                exempt_loopback=self.router.diversity.loopback == "exempt",
                                ping=self._proof_ping)
        self.liveness = ContactLiveness(
            self.router, storage, source_node, ksize, call=self.call, my_id=self.my_id,
            spawn=self.spawn, serving=self.serving, drops=self.drops,
            probe_budget=self.gate.budget_probe, limiter=limiter, on_revived=on_revived,
            dead_after=dead_after, dead_span=dead_span, handoff_rate=handoff_rate,
            require_keyed_ids=require_keyed_ids)
        self.handlers = RpcHandlers(
            router=self.router, storage=storage, source_node=source_node, ksize=ksize,
            max_skew=max_skew, liveness=self.liveness, gate=self.gate, drops=self.drops,
            has_token=self._request_has_token, serving=self.serving, my_id=self.my_id,
            local_host=self._local_host, prove_id=prove_id)
        self.engine = RpcEngine(
            self.handlers.table(), gate=self.gate, rto_min=rto_min, rto_max=rto_max,
            rto_initial=rto_initial, max_inflight=max_inflight, retransmits=retransmits,
            reply_rate=reply_rate, on_late_reply=self.liveness.alive, drops=self.drops,
            failed=self.failed)
        self.calls = CallQueue(self.engine, is_proven=self.gate.is_proven,
                               failed=self.failed, max_inflight=max_inflight)

    # ================================================================ glue
    def serving(self) -> bool:
        """Server mode: in others' routing tables, stores records for them."""
        return self.mode == "server"

    def my_id(self) -> bytes:
        """The node id we send: ours in server mode, ``b""`` in client mode."""
        return b"" if self.mode == "client" else self.source_node.id

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.engine.spawn(coro)

    def _request_has_token(self) -> bool:
        return self.engine.request_token_ok

    def _local_host(self) -> str:
        return self.engine.local_host()

    async def _proof_ping(self, address: Address) -> None:
        # an explicit timeout: no retransmission, so one ping is all the address gets
        await self.call(address, "ping", self.my_id(),
                        timeout=max(self.engine.rto(address), 0.5))

    @property
    def transport(self) -> Any:
        """The UDP transport (tests and benchmarks wrap it to emulate networks)."""
        return self.engine.transport

    @transport.setter
    def transport(self, value: Any) -> None:
        self.engine.transport = value

    @property
    def fast_rtt(self) -> float | None:
        return self.engine.fast_rtt

    def rto(self, address: Address | None = None) -> float:
        return self.engine.rto(address)

    def retransmitting(self, address: Address) -> bool:
        """A request to ``address`` missed its RTO and is unanswered (``RpcEngine``)."""
        return self.engine.retransmitting(address)

    def peer_srtt(self, address: Address) -> float | None:
        """``address``'s own smoothed RTT, None if never measured."""
        return self.engine.peer_srtt(address)

    def expected_rtt(self, address: Address) -> float | None:
        """The round trip ``address`` is expected to take: its own smoothed RTT, else the
        node's (a peer never measured), None before any sample (crawls: hedging and
        proximity neighbour selection)."""
        e = self.engine
        srtt = e.peer_srtt(address)
        return srtt if srtt is not None else e.srtt

    # ================================================================ calls
    async def call(self, address: Address, name: str, *args: Any,
                   timeout: float | None = None,  # noqa: ASYNC109
                   forget: bool = True) -> tuple[bool, Any]:
        """Request ``name(*args)`` from ``address`` (``call_queue``); ``(True, result)``
        or ``(False, None | QUEUE_FULL)``. Not counted against any contact. ``forget``:
        see ``CallQueue.call``."""
        return await self.calls.call(address, name, *args, timeout=timeout, forget=forget)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        return await self.liveness.ping(node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        result = await self.call((node_to_ask.ip, node_to_ask.port), "find_node",
                                 self.my_id(), node_to_find.id)
        return self.liveness.handle_call_response(result, node_to_ask)

    async def call_announce(self, node_to_ask: Node, key: bytes,
                            record: bytes) -> tuple[bool, Any]:
        return await self.liveness.announce(node_to_ask, key, record)

    async def call_list_providers(self, node_to_ask: Node, key: bytes, start: bytes,
                                  end: bytes) -> tuple[bool, Any]:
        result = await self.call((node_to_ask.ip, node_to_ask.port), "list_providers",
                                 self.my_id(), key, start, end)
        return self.liveness.handle_call_response(result, node_to_ask)

    async def call_find_providers(self, node_to_ask: Node, key: bytes,
                                  page: int | None = None) -> tuple[bool, Any]:
        args = (self.my_id(), key) if page is None else (self.my_id(), key, page)
        result = await self.call((node_to_ask.ip, node_to_ask.port), "find_providers", *args)
        return self.liveness.handle_call_response(result, node_to_ask)

    def holds_token(self, node: Node) -> bool:
        """Our next write to ``node`` carries a token it gave us (no challenge)."""
        return self.calls.has_token((node.ip, node.port))

    async def fetch_token(self, node: Node) -> bool:
        """Ask ``node`` to ``identify`` itself, for the write token its answer carries
        (``CallQueue`` keeps it): an announce's store lookup sends this beside its
        ``find_node`` so the store that follows is accepted at once. Nothing else of
        the answer is used and the outcome is not held against the contact: an old
        agent drops the unknown RPC, and its store takes the challenge path (the token
        that challenge teaches us is kept: ``forget=False``)."""
        ok, _res = await self.calls.call((node.ip, node.port), "identify", self.my_id(),
                                         os.urandom(16), forget=False)
        return ok

    # ================================================================ contacts
    def welcome_if_new(self, node: Node, *, handoff: bool = True) -> None:
        self.liveness.welcome_if_new(node, handoff=handoff)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        return self.liveness.handle_call_response(result, node)

    def is_suspect(self, node_id: bytes) -> bool:
        return self.liveness.is_suspect(node_id)

    def get_refresh_ids(self) -> list[bytes]:
        """A random id in each bucket not looked up for an hour (kademlia's refresh)."""
        return [random.randint(*bucket.range).to_bytes(20, byteorder="big")
                for bucket in self.router.lonely_buckets()]

    def revive(self) -> int:
        return self.liveness.revive()

    def housekeeping(self) -> None:
        self.liveness.housekeeping()

    def close(self) -> None:
        """Fail every outstanding request and cancel handler and background tasks."""
        self.engine.close()

    # ================================================================ stats
    def stats(self) -> dict[str, Any]:
        e = self.engine
        srtt = e.srtt
        live = self.liveness.stats()
        return {
            "drops": dict(self.drops),
            "rpc": {"sent": dict(e.tx), "received": dict(e.rx),
                    "timeouts": dict(e.timeouts), "failed": dict(self.failed)},
            "timeouts": sum(e.timeouts.values()),
            "rtt_ms": None if srtt is None else round(srtt * 1000, 3),
            "rto_ms": round(e.rto() * 1000, 3),
            "outstanding": e.outstanding,
            "removed_contacts": live["removed_contacts"],
            "false_deaths": live["false_deaths"],
            "late_responses": e.late_responses,
            "timeout_extensions": e.timeout_extensions,
            "retransmissions": e.retransmissions,
            "lost_requests": e.lost,
            "queued_requests": e.queued,
            "handoffs": live["handoffs"],
            "diversity_refused": self.router.diversity_refused,
            # "guard": the flood gate and the call queue (key kept for API readers)
            "guard": {**self.gate.stats(), **self.calls.stats()},
            "graveyard": live["graveyard"],
            "revived": live["revived"],
            "legacy_contacts": live["legacy_contacts"],
        }
