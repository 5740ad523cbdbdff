"""Token buckets, and log lines limited by them.

Anything a remote peer can trigger (a malformed datagram, a refused record, a failing
coordinator) must cost us bounded work and bounded log volume. One ``TokenBucket``
class serves the protocol's per-host reply budget, the RPC rate limits and the probe
rate; ``RateLimiter`` keeps one bucket per message kind for log lines and says how many
similar lines it suppressed when the next one gets through.
"""

from __future__ import annotations

import logging
import time
from collections import Counter


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class RateLimiter:
    """Per-key token buckets for log lines: ``burst`` lines, then ``rate`` per second.

    ``limiter.log(logger, level, key, msg, *args)``, or ``limiter(level, key, msg, *args)``
    when built with a ``logger``. At most ``max_keys`` keys are tracked (bounded memory
    whatever keys a peer makes us use).
    """

    def __init__(self, rate: float = 1.0, burst: float = 5, logger: logging.Logger | None = None,
                 max_keys: int = 256) -> None:
        self.rate, self.burst, self.logger, self.max_keys = rate, burst, logger, max_keys
        self.buckets: dict[str, TokenBucket] = {}
        self.suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> tuple[bool, int]:
        """(allowed, lines suppressed since the last allowed one)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self.buckets.clear()
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        if not bucket.take():
            self.suppressed[key] += 1
            return False, self.suppressed[key]
        return True, self.suppressed.pop(key, 0)

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object) -> None:
        ok, dropped = self.allow(key)
        if ok:
            if dropped:
                msg += f" ({dropped} similar lines suppressed)"
            logger.log(level, msg, *args)

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        self.log(self.logger or logging.getLogger("rma_agent"), level, key, msg, *args)
