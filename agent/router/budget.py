"""A retry budget: retries may add at most ``ratio`` (20 %) extra requests.

Why: when a worker fails, every request routed to it is retried elsewhere; when *many*
fail (a bad deploy, an overloaded region) unbounded retries multiply the load exactly when
the network has least to spare. Like Finagle's and gRPC's retry budgets, each routed
request deposits ``ratio`` of a token and each retry spends a whole one, so over any
stretch of traffic retries are at most ``ratio`` x requests, plus a small ``reserve`` banked
at start (an idle agent can still retry its first few failures). The bank is capped so
long quiet stretches cannot save up a retry storm. It is a token bucket refilled by
requests instead of by time.

Only retries that may send the *work* to a worker twice are charged: trying the next worker
after a refused connection, a failed ownership proof or a gateway's "full, not processed"
refusal (``503`` + ``RMA-Not-Processed``) sends the work to nobody twice. Those are bounded
otherwise: by ``discovery.max_attempts`` per request, and a full worker is held for its
``Retry-After`` so a router meets it at most once per hold. Charging them made a cold router
(the reserve only) relay the pool's momentary "full" to its callers after ten refusals,
while the other workers had free slots.
"""

from __future__ import annotations

RATIO = 0.2
RESERVE = 10.0


class RetryBudget:
    """Deposit on each request, withdraw on each charged retry."""

    __slots__ = ("cap", "ratio", "refused", "tokens")

    def __init__(self, ratio: float = RATIO, reserve: float = RESERVE,
                 cap: float | None = None) -> None:
        self.ratio = ratio
        self.cap = cap if cap is not None else 2.0 * reserve
        self.tokens = reserve
        self.refused = 0

    def deposit(self) -> None:
        """A new routed request."""
        t = self.tokens + self.ratio
        self.tokens = t if t < self.cap else self.cap

    def withdraw(self) -> bool:
        """Spend one retry; False (and counted) when the budget is exhausted."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False
