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
— and their requests for large answers get the challenge until they are proven (our
contact-verification ping proves a server-mode peer within one round trip). Upgrade the
storing nodes (coordinators, reachable boxes) and the workers together.

Loopback follows the diversity policy: exempt from the byte budget by default (in-process
tests and benchmarks), treated like any address under ``RMA_AGENT_DHT_LOOPBACK=strict``.
Tokens are required on loopback too, so every test exercises the token path.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any

import msgpack

from agent.dht.tokens import TOKEN_LEN, AddressGuard, TokenCache, WriteTokens
from agent.dht.wire import HEADER, MAX_PAYLOAD, _norm_host

Address = tuple[str, int]


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
        self.write_tokens = WriteTokens()
        self.peer_tokens = TokenCache()
        self.addr_guard = AddressGuard(factor=amplification)
        self._rx_len = 0
        self._request_token_ok = False
        self.per_peer_inflight = per_peer_inflight
        self.max_queued = max_queued
        self._waiting = 0
        self._peer_slots: OrderedDict[Address, list[Any]] = OrderedDict()  # [sem, users]
        unproven = max_unproven if max_unproven is not None else max(1, (3 * max_inflight) // 8)
        self._unproven_slots = asyncio.Semaphore(unproven)
        self.challenges = 0

    # ---------------------------------------------------------------- helpers
    def _exempt(self, address: Address) -> bool:
        policy = getattr(self.router, "diversity", None)
        return policy is not None and policy.is_exempt(str(address[0]))

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
                return super()._respond(msg_id, challenge, address)  # type: ignore[misc]
        self.drops["reply_amplification"] += 1
        return None

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        entry = self._outstanding.get(msg_id)
        sent_to = entry.address if entry is not None else (
            self._late.get(msg_id, (None, 0))[0])
        if sent_to is not None and (_norm_host(address[0]), address[1]) == (
                _norm_host(sent_to[0]), sent_to[1]):
            # it read our random message id: the address is real
            self.addr_guard.prove(address)
        return super()._accept_response(msg_id, data, address)  # type: ignore[misc]

    # ---------------------------------------------------------------- outgoing
    async def _call(self, address: Address, name: str, *args: Any,
                    timeout: float | None = None) -> tuple[bool, Any]:  # noqa: ASYNC109
        """``RpcEngine._call`` with tokens (sent when we hold one, learned from answers and
        challenges, one retry after a challenge) and per-peer / unproven / queue limits."""
        result = await self._limited_call(address, name, args, timeout)
        ok, data = result
        if ok and isinstance(data, dict) and type(data.get("token")) is bytes:
            self.peer_tokens.put(address, data["token"])
            if is_challenge(data):
                result = await self._limited_call(address, name, args, timeout)
                ok, data = result
                if ok and is_challenge(data):
                    self.failed["token_refused"] += 1
                    return (False, None)
        elif not ok:
            self.peer_tokens.drop(address)   # maybe not (or no longer) a token-aware peer
        return result

    async def _limited_call(self, address: Address, name: str, args: tuple[Any, ...],
                            timeout: float | None) -> tuple[bool, Any]:  # noqa: ASYNC109
        """Wait for this peer's slot, then (for an unproven address) an unproven slot,
        then a global one; a call counts as waiting until its request is on the wire."""
        if self._waiting >= self.max_queued:
            self.failed["queue_full"] += 1
            return (False, None)
        token = self.peer_tokens.get(address)
        env = [name, list(args)] if token is None else [name, list(args), token]
        payload = msgpack.packb(env, use_bin_type=True)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"rpc {name}: request of {len(payload)} bytes exceeds 8 KiB")
        key = (_norm_host(address[0]), address[1])
        slot = self._peer_slots.get(key)
        if slot is None:
            slot = self._peer_slots[key] = [asyncio.Semaphore(self.per_peer_inflight), 0]
        slot[1] += 1
        proven = self._exempt(address) or self.addr_guard.is_proven(address)
        self._waiting += 1
        waiting = True
        try:
            async with slot[0], (nullcontext() if proven else self._unproven_slots):
                if self._slots.locked():  # type: ignore[attr-defined]
                    self.queued += 1  # type: ignore[attr-defined]
                async with self._slots:  # type: ignore[attr-defined]
                    self._waiting -= 1
                    waiting = False
                    return await self._send_and_wait(  # type: ignore[attr-defined]
                        address, name, payload, timeout)
        finally:
            if waiting:
                self._waiting -= 1
            slot[1] -= 1
            if slot[1] == 0:
                self._peer_slots.pop(key, None)

    def guard_stats(self) -> dict[str, Any]:
        return {"challenges": self.challenges, "token_peers": len(self.peer_tokens),
                "waiting_calls": self._waiting, **self.addr_guard.stats()}
