"""Our own requests: write tokens sent and learned, and fair queueing toward each peer.

``CallQueue.call`` is how the protocol sends every request (over ``rpc.RpcEngine``):

* **Tokens** (``tokens.TokenCache``, see ``flood_gate``): the last token a peer address
  gave us rides along as a third envelope element ``[name, args, token]``; a token in an
  answer is remembered; a *challenge* (``{"token": T}`` instead of an answer) is
  remembered and the request repeated once. A failed call forgets the peer's token (it
  may not be token-aware, or no longer). Old agents never gave us a token, so they never
  see a 3-element envelope.
* **Fair queueing.** At most ``per_peer_inflight`` (8) requests to one address are on the
  wire; more wait for that address only, not for a global slot. Requests to addresses
  that never proved themselves (what a lying peer's list of dead addresses is) share at
  most ``max_unproven`` (3/8 of the engine's ``max_inflight``) slots, so they cannot
  starve requests to live peers; and at most ``max_queued`` (1024) calls may wait at all
  — beyond that a call fails at once with ``(False, QUEUE_FULL)`` (our backlog, not held
  against the peer) instead of growing an unbounded queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import msgpack

from agent.dht.flood_gate import is_challenge
from agent.dht.rpc import QUEUE_FULL, RpcEngine
from agent.dht.tokens import TokenCache
from agent.dht.wire import MAX_PAYLOAD, _norm_host

Address = tuple[str, int]


class CallQueue:
    """Sends requests through ``engine`` with tokens and per-peer limits (see module).

    ``is_proven(address)``: the address showed it receives at its address (the request
    gate's knowledge), so it does not need an unproven slot."""

    def __init__(self, engine: RpcEngine, *, is_proven: Callable[[Address], bool],
                 failed: Counter[str], max_inflight: int = 64, per_peer_inflight: int = 8,
                 max_unproven: int | None = None, max_queued: int = 1024) -> None:
        self.engine = engine
        self.is_proven = is_proven
        self.failed = failed
        self.peer_tokens = TokenCache()
        self.per_peer_inflight = per_peer_inflight
        self.max_queued = max_queued
        self.waiting = 0
        # peer -> [requests in flight, waiting futures or None]
        self._peer_slots: dict[Address, list[Any]] = {}
        unproven = max_unproven if max_unproven is not None else max(1, (3 * max_inflight) // 8)
        self.unproven_slots = asyncio.Semaphore(unproven)

    async def call(self, address: Address, name: str, *args: Any,
                   timeout: float | None = None,  # noqa: ASYNC109
                   forget: bool = True) -> tuple[bool, Any]:
        """Request ``name(*args)`` from ``address``: ``(True, result)`` or ``(False, ...)``.
        Waits for this peer's slot, then (for an unproven address) an unproven slot, then
        the engine's global one; a call counts as waiting until its request is on the
        wire. ``forget=False``: a failure keeps the peer's token (a request an old agent
        drops as unknown says nothing about its tokens). (One coroutine on purpose: this
        runs for every RPC.)"""
        key = (_norm_host(address[0]), address[1])
        for attempt in (0, 1):
            if self.waiting >= self.max_queued:
                self.failed["queue_full"] += 1
                return (False, QUEUE_FULL)  # our backlog: not held against the peer
            token = self.peer_tokens.get(address)
            payload = msgpack.packb([name, args] if token is None else [name, args, token],
                                    use_bin_type=True)
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"rpc {name}: request of {len(payload)} bytes exceeds 8 KiB")
            proven = self.is_proven(address)
            self.waiting += 1
            waiting = [True]

            def on_wire(waiting: list[bool] = waiting) -> None:
                self.waiting -= 1
                waiting[0] = False

            slot = self._peer_slots.get(key)
            try:
                if slot is None:
                    self._peer_slots[key] = [1, None]
                elif slot[0] < self.per_peer_inflight:
                    slot[0] += 1
                else:
                    await self._peer_acquire(key)
                try:
                    if not proven:
                        await self.unproven_slots.acquire()
                    try:
                        result = await self.engine.exchange(address, name, payload, timeout,
                                                            on_wire)
                    finally:
                        if not proven:
                            self.unproven_slots.release()
                finally:
                    self._peer_release(key)
            finally:
                if waiting[0]:
                    self.waiting -= 1
            ok, data = result
            if not ok:
                if forget:
                    self.peer_tokens.drop(address)   # maybe not (or no longer) token-aware
                return result
            if type(data) is not dict or type(data.get("token")) is not bytes:
                return result
            self.peer_tokens.put(address, data["token"])
            if not is_challenge(data):
                return result
            if attempt:
                self.failed["token_refused"] += 1
                return (False, None)
        return (False, None)  # not reached

    async def _peer_acquire(self, key: Address) -> None:
        """Wait for one of the ``per_peer_inflight`` slots of ``key`` (``call`` takes a
        free one inline; only a peer at its limit makes callers queue here)."""
        slot = self._peer_slots[key]
        if slot[1] is None:
            slot[1] = deque()
        fut = asyncio.get_running_loop().create_future()
        slot[1].append(fut)
        try:
            await fut               # the releasing call hands its slot over
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._peer_release(key)   # handed over, but we are gone: pass it on
            else:
                try:
                    slot[1].remove(fut)
                except ValueError:      # a release already skipped it
                    pass
            raise

    def _peer_release(self, key: Address) -> None:
        slot = self._peer_slots.get(key)
        if slot is None:
            return
        waiters = slot[1]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        slot[0] -= 1
        if slot[0] <= 0:
            del self._peer_slots[key]

    def has_token(self, address: Address) -> bool:
        """A token from ``address`` is in hand: a write to it needs no challenge."""
        return self.peer_tokens.get(address) is not None

    def stats(self) -> dict[str, Any]:
        return {"token_peers": len(self.peer_tokens), "waiting_calls": self.waiting}
