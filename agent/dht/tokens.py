"""Source-address proof: write tokens (BEP 5's model) and the anti-amplification budget.

UDP source addresses are forged for free. Two things must not follow from a forged one:

* **storing** — an ``announce`` from a spoofed source would let an attacker on one
  machine store under any address (and so dodge the per-host quotas of ``storage``);
* **reflection** — a 60-byte request with a victim's source address drawing an 8 KiB
  answer makes the node a 100x amplifier aimed at the victim.

``WriteTokens`` issues ``HMAC-SHA256(secret, ip)[:8]`` to an address; only someone who
receives datagrams at that IP can learn it. The secret rotates every ``rotate`` seconds
and the previous one is still accepted, so a token lives 5-10 minutes (BEP 5 does the
same with 5-minute secrets). Nothing per peer is stored on the issuing side.

``AddressBudget`` keeps, per ``(ip, port)`` that has not proven it receives at its
address, the bytes received from and sent to it, and lets a reply through only while
``sent + reply <= factor x received`` (``factor`` 3, QUIC's anti-amplification rule).
An address is *proven* once it answers one of our requests (the reply carried our random
message id, so it read our datagram) or sends a valid token; proven addresses are
remembered for ``ttl`` seconds (bounded LRU). Loopback is exempt unless the diversity
policy is strict.

``TokenCache`` is the asking side: the last token each peer gave us, sent with every
later request to it (valid for ``max_age``; a rejected or expired one is replaced by the
next challenge).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from typing import Any

TOKEN_LEN = 8
Address = tuple[str, int]


def _norm(ip: str) -> str:
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


class WriteTokens:
    """Stateless per-IP tokens under a rotating secret (see module docstring)."""

    def __init__(self, rotate: float = 300.0, now: float | None = None) -> None:
        self.rotate = rotate
        self._secret = os.urandom(32)
        self._previous = self._secret
        self._rotated_at = time.monotonic() if now is None else now
        self._issued: dict[str, bytes] = {}    # ip -> current token (an HMAC costs ~8 µs)

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= self.rotate:
            self._issued.clear()
            # a pause longer than two periods invalidates both old secrets
            self._previous = self._secret if now - self._rotated_at < 2 * self.rotate \
                else os.urandom(32)
            self._secret = os.urandom(32)
            self._rotated_at = now

    @staticmethod
    def _mac(secret: bytes, ip: str) -> bytes:
        return hmac.new(secret, _norm(ip).encode(), hashlib.sha256).digest()[:TOKEN_LEN]

    def issue(self, ip: str, now: float | None = None) -> bytes:
        self._maybe_rotate(time.monotonic() if now is None else now)
        tok = self._issued.get(ip)
        if tok is None:
            if len(self._issued) >= 4096:
                self._issued.clear()
            tok = self._issued[ip] = self._mac(self._secret, ip)
        return tok

    def check(self, ip: str, token: Any, now: float | None = None) -> bool:
        if type(token) is not bytes or len(token) != TOKEN_LEN:
            return False
        return (hmac.compare_digest(token, self.issue(ip, now))
                or hmac.compare_digest(token, self._mac(self._previous, ip)))


class AddressBudget:
    """Which addresses proved they receive at their address, and the byte budget of
    those that have not (see module docstring). Memory is bounded by ``max_entries``."""

    def __init__(self, factor: float = 3.0, ttl: float = 600.0,
                 max_entries: int = 8192) -> None:
        self.factor = factor
        self.ttl = ttl
        self.max_entries = max_entries
        self._proven: OrderedDict[Address, float] = OrderedDict()
        self._budget: OrderedDict[Address, list[int]] = OrderedDict()  # [received, sent]

    @staticmethod
    def _key(addr: Address) -> Address:
        return (_norm(addr[0]), addr[1])

    def prove(self, addr: Address, now: float | None = None) -> None:
        key = self._key(addr)
        now = time.monotonic() if now is None else now
        last = self._proven.get(key)
        if last is not None and now - last < self.ttl / 8:
            return                      # proven moments ago: skip the LRU upkeep
        self._proven[key] = now
        self._proven.move_to_end(key)
        if len(self._proven) > self.max_entries:
            self._proven.popitem(last=False)
        self._budget.pop(key, None)

    def is_proven(self, addr: Address, now: float | None = None) -> bool:
        key = self._key(addr)
        t = self._proven.get(key)
        if t is None:
            return False
        now = time.monotonic() if now is None else now
        if now - t > self.ttl:
            del self._proven[key]
            return False
        return True

    def received(self, addr: Address, size: int) -> None:
        """Count a request's bytes from an address not (yet) proven."""
        key = self._key(addr)
        entry = self._budget.get(key)
        if entry is None:
            entry = self._budget[key] = [0, 0]
            if len(self._budget) > self.max_entries:
                self._budget.popitem(last=False)
        else:
            self._budget.move_to_end(key)
        entry[0] += size

    def may_send(self, addr: Address, size: int) -> bool:
        """True (and counted) if ``size`` more bytes keep the address within budget."""
        entry = self._budget.get(self._key(addr))
        if entry is None:
            return False
        if entry[1] + size > self.factor * entry[0]:
            return False
        entry[1] += size
        return True

    def stats(self) -> dict[str, int]:
        return {"proven": len(self._proven), "unproven": len(self._budget)}


class TokenCache:
    """The asking side: the latest token each peer address gave us."""

    def __init__(self, max_age: float = 240.0, max_entries: int = 8192) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._tokens: OrderedDict[Address, tuple[bytes, float]] = OrderedDict()

    def get(self, addr: Address, now: float | None = None) -> bytes | None:
        hit = self._tokens.get(addr)
        if hit is None:
            return None
        now = time.monotonic() if now is None else now
        if now - hit[1] > self.max_age:
            del self._tokens[addr]
            return None
        return hit[0]

    def put(self, addr: Address, token: bytes, now: float | None = None) -> None:
        self._tokens[addr] = (token, time.monotonic() if now is None else now)
        self._tokens.move_to_end(addr)
        if len(self._tokens) > self.max_entries:
            self._tokens.popitem(last=False)

    def drop(self, addr: Address) -> None:
        self._tokens.pop(addr, None)

    def __len__(self) -> int:
        return len(self._tokens)
