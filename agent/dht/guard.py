"""Defences against hostile peers on the wire: write tokens, amplification, fair queueing.

``HostileGuard`` is a mixin layered over the RPC engine (``rpc.RpcEngine``); the protocol
class lists it first. What it adds, and why:

* **Write tokens (BEP 5's model, ``tokens.WriteTokens``).** A request may carry a token as
  a third envelope element: ``[name, args, token]``. ``announce`` is only accepted with
  a valid token for the sender's IP; without one the node answers a *challenge*
  ``{"token": T}`` (about 40 bytes) instead of storing. ``find_providers`` answers also
  carry ``"token"``. The asking side (``_call``) remembers the last token of each peer
  address (``tokens.TokenCache``) and sends it with every later request; on a challenge
  it stores the token and repeats the request once. A spoofed source never sees the
  token, so it cannot store — and so cannot dodge the per-host storage quotas either.
* **Anti-amplification (``tokens.AddressGuard``).** To an address that has not proven it
  receives at its address (it never answered one of our requests and sent no valid
  token), the node sends at most 2.5x the bytes it received from it (QUIC allows 3x;
  the margin keeps every datagram we send there, the ``reachable`` probe included,
  under 3x). A reply that would
  exceed that becomes the small challenge (or is dropped when even that does not fit),
  so a spoofed 60-byte ``find_providers`` draws at most ~40 bytes at the victim, not
  8 KiB. Honest askers pay one round trip once per token lifetime.
* **Fair queueing of our own requests.** At most ``per_peer_inflight`` (8) requests to
  one address are on the wire; more wait for that address only, not for a global slot.
  Requests to addresses that never answered us (what a lying peer's list of dead
  addresses is) share at most ``max_unproven`` (24) of the ``max_inflight`` slots, so
  they cannot starve requests to live peers; and at most ``max_queued`` (1024) calls may
  wait at all — beyond that a call fails at once (``failed["queue_full"]``) instead of
  growing an unbounded queue.

Interop with agents without tokens (0.1.x): they never send a 3-element envelope and
never receive one (we send a token only to an address that gave us one), so lookups work
both ways; our announces to them are accepted as before. Their announces to us are
answered with a challenge they do not understand — refused (``drops["announce_no_token"]``)
— and their first request for a large answer gets the challenge, which they read as an
empty answer; the node then pings the address (``_prove_by_ping``, within the byte
budget) and, once it answers, the old agent's retransmission or next request gets the
full answer (one retransmission timeout per node, once per 10 minutes). Upgrade the
storing nodes (coordinators, reachable boxes) and the workers together.

Loopback follows the diversity policy: exempt from the byte budget by default (in-process
tests and benchmarks), treated like any address under ``RMA_AGENT_DHT_LOOPBACK=strict``.
Tokens are required on loopback too, so every test exercises the token path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import msgpack

from agent.dht.rpc import QUEUE_FULL
from agent.dht.tokens import TOKEN_LEN, AddressGuard, TokenCache, WriteTokens
from agent.dht.wire import HEADER, MAX_PAYLOAD, _norm_host

Address = tuple[str, int]
PING_BYTES = 52                     # a ping request datagram (50 bytes), rounded up


def is_challenge(result: Any) -> bool:
    """A challenge reply: ``{"token": T}`` and nothing else."""
    return (isinstance(result, dict) and len(result) == 1
            and type(result.get("token")) is bytes and len(result["token"]) == TOKEN_LEN)


class HostileGuard:
    """Mixin over ``RpcEngine`` (see module docstring)."""

    router: Any
    drops: Any
    failed: Any
    _outstanding: dict[bytes, Any]
    _late: Any

    def _init_guard(self, *, max_inflight: int, per_peer_inflight: int = 8,
                    max_unproven: int | None = None, max_queued: int = 1024,
                    amplification: float = 2.5) -> None:
        self._exempt_loopback: bool | None = None    # read from the router's policy
        self.write_tokens = WriteTokens()
        self.peer_tokens = TokenCache()
        self.addr_guard = AddressGuard(factor=amplification)
        self._rx_len = 0
        self._request_token_ok = False
        self.per_peer_inflight = per_peer_inflight
        self.max_queued = max_queued
        self._waiting = 0
        # peer -> [requests in flight, waiting futures or None]
        self._peer_slots: dict[Address, list[Any]] = {}
        unproven = max_unproven if max_unproven is not None else max(1, (3 * max_inflight) // 8)
        self._unproven_slots = asyncio.Semaphore(unproven)
        self.challenges = 0
        self._proving: set[Address] = set()

    # ---------------------------------------------------------------- helpers
    def _exempt(self, address: Address) -> bool:
        """Loopback under the default policy (hot path: 3-4 calls per RPC exchange)."""
        exempt = self._exempt_loopback
        if exempt is None:
            policy = getattr(self.router, "diversity", None)
            exempt = self._exempt_loopback = policy is not None and policy.loopback == "exempt"
        if not exempt:
            return False
        host = address[0]
        return host.startswith(("127.", "::ffff:127.")) or host == "::1"

    def budget_probe(self, address: Address, size: int) -> bool:
        """May we send ``size`` bytes on behalf of a request from ``address`` (e.g. the
        ``reachable`` probe ping)? Counted against that address's budget when unproven."""
        if self._exempt(address) or self.addr_guard.is_proven(address):
            return True
        return self.addr_guard.may_send(address, size)

    def challenge(self, address: Address) -> dict[str, bytes]:
        """The reply that hands a token to ``address`` instead of an answer."""
        self.challenges += 1
        return {"token": self.write_tokens.issue(str(address[0]))}

    def request_has_token(self) -> bool:
        """Did the request being handled carry a valid token for its source IP? (Read by
        handlers, which run synchronously inside ``_accept_request``.)"""
        return self._request_token_ok

    # ---------------------------------------------------------------- incoming
    def _solve_datagram(self, datagram: bytes, address: Address) -> None:
        self._rx_len = len(datagram)
        return super()._solve_datagram(datagram, address)  # type: ignore[misc]

    def _accept_request(self, msg_id: bytes, data: Any, address: Address) -> None:
        token_ok = False
        if isinstance(data, list) and len(data) == 3 and isinstance(data[1], list):
            token_ok = self.write_tokens.check(str(address[0]), data[2])
            if not token_ok:
                self.drops["bad_token"] += 1
            data = data[:2]
        if token_ok:
            self.addr_guard.prove(address)
        elif not self._exempt(address) and not self.addr_guard.is_proven(address):
            self.addr_guard.received(address, self._rx_len)
        self._request_token_ok = token_ok
        try:
            return super()._accept_request(msg_id, data, address)  # type: ignore[misc]
        finally:
            self._request_token_ok = False

    def _respond(self, msg_id: bytes, result: Any, address: Address) -> None:
        if self._exempt(address) or self.addr_guard.is_proven(address):
            return super()._respond(msg_id, result, address)  # type: ignore[misc]
        try:
            size = HEADER + len(msgpack.packb(result, use_bin_type=True))
        except Exception:
            self.drops["unpackable_response"] += 1
            return None
        if self.addr_guard.may_send(address, size):
            return super()._respond(msg_id, result, address)  # type: ignore[misc]
        if not is_challenge(result):
            challenge = self.challenge(address)
            if self.addr_guard.may_send(address, HEADER + len(
                    msgpack.packb(challenge, use_bin_type=True))):
                self.drops["reply_needs_token"] += 1
                super()._respond(msg_id, challenge, address)  # type: ignore[misc]
                self._prove_by_ping(address)
                return None
        self.drops["reply_amplification"] += 1
        return None

    def _prove_by_ping(self, address: Address) -> None:
        """Ping an address we just challenged: if it answers, it is proven and its next
        request (an old agent's retransmission, which carries no token) gets the full
        answer. Counted against the address's byte budget (so a spoofed source gets
        the challenge and this ping, together still under 2.5x what it sent) and
        limited to one ping in flight per address and the contact-verification rate."""
        if address in self._proving or len(self._proving) >= 256:
            return
        if not self.addr_guard.may_send(address, PING_BYTES):
            return
        bucket = getattr(self, "_verify_bucket", None)
        if bucket is not None and not bucket.take():
            return
        self._proving.add(address)
        self._spawn(self._ping_to_prove(address))  # type: ignore[attr-defined]

    async def _verify_contact(self, node: Any, handoff: bool = True) -> None:
        """Contact verification (``liveness``) pings the claimed address — up to two
        datagrams with the retransmission. For an unproven address that counts against
        its byte budget: a spoofed request must not buy more than 2.5x its size."""
        if not self.budget_probe((node.ip, node.port), 2 * PING_BYTES):
            self._verifying.discard(node.id)  # type: ignore[attr-defined]
            self.drops["verify_budget"] += 1
            return
        await super()._verify_contact(node, handoff)  # type: ignore[misc]

    async def _ping_to_prove(self, address: Address) -> None:
        try:
            # an explicit timeout: no retransmission, so one ping is all the address gets
            await self._call(address, "ping", self.my_id(),  # type: ignore[attr-defined]
                             timeout=max(self.rto(address), 0.5))  # type: ignore[attr-defined]
        finally:
            self._proving.discard(address)

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        entry = self._outstanding.get(msg_id)
        sent_to = entry.address if entry is not None else (
            self._late.get(msg_id, (None, 0))[0])
        if sent_to is not None and not self._exempt(address) and (
                _norm_host(address[0]), address[1]) == (_norm_host(sent_to[0]), sent_to[1]):
            # it read our random message id: the address is real
            self.addr_guard.prove(address)
        return super()._accept_response(msg_id, data, address)  # type: ignore[misc]

    # ---------------------------------------------------------------- outgoing
    async def _call(self, address: Address, name: str, *args: Any,
                    timeout: float | None = None) -> tuple[bool, Any]:  # noqa: ASYNC109
        """``RpcEngine._call`` with tokens (sent when we hold one, learned from answers and
        challenges, one retry after a challenge) and per-peer / unproven / queue limits:
        wait for this peer's slot, then (for an unproven address) an unproven slot, then
        a global one; a call counts as waiting until its request is on the wire. (One
        coroutine on purpose: this runs for every RPC.)"""
        key = (_norm_host(address[0]), address[1])
        for attempt in (0, 1):
            if self._waiting >= self.max_queued:
                self.failed["queue_full"] += 1
                return (False, QUEUE_FULL)  # our backlog: not held against the peer
            token = self.peer_tokens.get(address)
            payload = msgpack.packb([name, args] if token is None else [name, args, token],
                                    use_bin_type=True)
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"rpc {name}: request of {len(payload)} bytes exceeds 8 KiB")
            proven = self._exempt(address) or self.addr_guard.is_proven(address)
            self._waiting += 1
            waiting = True
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
                        await self._unproven_slots.acquire()
                    try:
                        if self._slots.locked():  # type: ignore[attr-defined]
                            self.queued += 1  # type: ignore[attr-defined]
                        async with self._slots:  # type: ignore[attr-defined]
                            self._waiting -= 1
                            waiting = False
                            result = await self._send_and_wait(  # type: ignore[attr-defined]
                                address, name, payload, timeout)
                    finally:
                        if not proven:
                            self._unproven_slots.release()
                finally:
                    self._peer_release(key)
            finally:
                if waiting:
                    self._waiting -= 1
            ok, data = result
            if not ok:
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
        """Wait for one of the ``per_peer_inflight`` slots of ``key`` (``_call`` takes a
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

    def guard_stats(self) -> dict[str, Any]:
        return {"challenges": self.challenges, "token_peers": len(self.peer_tokens),
                "waiting_calls": self._waiting, **self.addr_guard.stats()}
