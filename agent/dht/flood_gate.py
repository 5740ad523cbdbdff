"""What a request from an address that has not proven itself may store or draw: the gate
against spoofed-source floods (write tokens, anti-amplification).

``RequestGate`` is the ``rpc.WireGate`` the RPC engine is built with: the engine asks it
about every request (``inbound``), every reply (``screen_reply``) and every answer to our
own requests (``replied``). Our own requests go through ``call_queue.CallQueue``, which
sends the tokens and bounds what waits. What the two add, and why:

* **Write tokens (BEP 5's model, ``tokens.WriteTokens``).** A request may carry a token as
  a third envelope element: ``[name, args, token]``. ``announce`` is only accepted with
  a valid token for the sender's IP; without one the node answers a *challenge*
  ``{"token": T}`` (about 40 bytes) instead of storing. ``find_providers`` answers also
  carry ``"token"``. The asking side (``call_queue.CallQueue``) remembers the last token
  of each peer address (``tokens.TokenCache``) and sends it with every later request; on
  a challenge it stores the token and repeats the request once. A spoofed source never
  sees the token, so it cannot store — and so cannot dodge the per-host storage quotas.
* **Anti-amplification (``tokens.AddressBudget``).** To an address that has not proven it
  receives at its address (it never answered one of our requests and sent no valid
  token), the node sends at most 2.5x the bytes it received from it (QUIC allows 3x;
  the margin keeps every datagram we send there, the ``reachable`` probe included,
  under 3x). A reply that would
  exceed that becomes the small challenge (or is dropped when even that does not fit),
  so a spoofed 60-byte ``find_providers`` draws at most ~40 bytes at the victim, not
  8 KiB. Honest askers pay one round trip once per token lifetime.
* **Fair queueing of our own requests** (``call_queue``). At most ``per_peer_inflight``
  (8) requests to one address are on the wire; more wait for that address only.
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

from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgpack

from agent.dht.rpc import SUPPRESS
from agent.dht.tokens import TOKEN_LEN, AddressBudget, WriteTokens
from agent.dht.wire import HEADER
from agent.ratelimit import TokenBucket

Address = tuple[str, int]
PING_BYTES = 52                     # a ping request datagram (50 bytes), rounded up


def is_challenge(result: Any) -> bool:
    """A challenge reply: ``{"token": T}`` and nothing else."""
    return (isinstance(result, dict) and len(result) == 1
            and type(result.get("token")) is bytes and len(result["token"]) == TOKEN_LEN)


def is_loopback(address: Address) -> bool:
    host = address[0]
    return host.startswith(("127.", "::ffff:127.")) or host == "::1"


class RequestGate:
    """Screens requests and replies by source address (see module docstring).

    ``exempt_loopback``: loopback is not budgeted (the diversity policy's default).
    ``ping``: sends one ping to an address (no retransmission) — how a challenged
    address is proven; ``spawn`` runs it; ``limiter`` is the node's contact-verification
    rate, which these pings share.
    """

    def __init__(self, *, drops: Counter[str], exempt_loopback: bool,
                 ping: Callable[[Address], Awaitable[Any]],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None],
                 limiter: TokenBucket | None = None,
                 budget: AddressBudget | None = None,
                 write_tokens: WriteTokens | None = None,
                 amplification: float = 2.5) -> None:
        self.drops = drops
        self.exempt_loopback = exempt_loopback
        self._ping = ping
        self._spawn = spawn
        self._limiter = limiter
        self.budget = budget if budget is not None else AddressBudget(factor=amplification)
        self.write_tokens = write_tokens if write_tokens is not None else WriteTokens()
        self.challenges = 0
        self._proving: set[Address] = set()

    # ---------------------------------------------------------------- questions
    def exempt(self, address: Address) -> bool:
        """Loopback under the default policy (hot path: 3-4 calls per RPC exchange)."""
        return self.exempt_loopback and is_loopback(address)

    def is_proven(self, address: Address) -> bool:
        return self.exempt(address) or self.budget.is_proven(address)

    def budget_probe(self, address: Address, size: int) -> bool:
        """May we send ``size`` bytes on behalf of a request from ``address`` (e.g. the
        ``reachable`` probe ping, a contact-verification ping)? Counted against that
        address's budget when unproven."""
        if self.is_proven(address):
            return True
        return self.budget.may_send(address, size)

    def challenge(self, address: Address) -> dict[str, bytes]:
        """The reply that hands a token to ``address`` instead of an answer."""
        self.challenges += 1
        return {"token": self.write_tokens.issue(str(address[0]))}

    def token_for(self, address: Address) -> bytes:
        """The token ``address`` must send with its writes (rides along in answers)."""
        return self.write_tokens.issue(address[0])

    # ---------------------------------------------------------------- WireGate
    def inbound(self, data: Any, address: Address, size: int) -> tuple[Any, bool]:
        token_ok = False
        if isinstance(data, list) and len(data) == 3 and isinstance(data[1], list):
            token_ok = self.write_tokens.check(str(address[0]), data[2])
            if not token_ok:
                self.drops["bad_token"] += 1
            data = data[:2]
        if token_ok:
            self.budget.prove(address)
        elif not self.exempt(address) and not self.budget.is_proven(address):
            self.budget.received(address, size)
        return data, token_ok

    def screen_reply(self, result: Any, size: int, address: Address) -> Any:
        if self.is_proven(address) or self.budget.may_send(address, size):
            return result
        if not is_challenge(result):
            challenge = self.challenge(address)
            if self.budget.may_send(address, HEADER + len(
                    msgpack.packb(challenge, use_bin_type=True))):
                self.drops["reply_needs_token"] += 1
                self._prove_by_ping(address)
                return challenge
        self.drops["reply_amplification"] += 1
        return SUPPRESS

    def replied(self, address: Address) -> None:
        if not self.exempt(address):
            self.budget.prove(address)

    # ---------------------------------------------------------------- proof by ping
    def _prove_by_ping(self, address: Address) -> None:
        """Ping an address we just challenged: if it answers, it is proven and its next
        request (an old agent's retransmission, which carries no token) gets the full
        answer. Counted against the address's byte budget (so a spoofed source gets
        the challenge and this ping, together still under 2.5x what it sent) and
        limited to one ping in flight per address and the contact-verification rate.
        (The ping is a task: it leaves after the challenge.)"""
        if address in self._proving or len(self._proving) >= 256:
            return
        if not self.budget.may_send(address, PING_BYTES):
            return
        if self._limiter is not None and not self._limiter.take():
            return
        self._proving.add(address)
        self._spawn(self._ping_to_prove(address))

    async def _ping_to_prove(self, address: Address) -> None:
        try:
            await self._ping(address)
        finally:
            self._proving.discard(address)

    def stats(self) -> dict[str, Any]:
        return {"challenges": self.challenges, **self.budget.stats()}
