"""Round-trip time estimation and retransmission timeouts (RFC 6298), one peer at a time.

Why a module of its own: the same arithmetic decides when a request is retransmitted,
when it counts as lost (``rpc``), how long a lookup waits before it also asks the next
candidate (``crawling``) and which of equally close contacts is asked first (proximity
neighbour selection). On the links volunteers have (30-300 ms round trips, 0.5-5 % bursty
loss, jitter) a timeout sized for loopback declares live peers dead after one lost
datagram; a timeout sized for the worst peer makes every lookup wait for it. So each peer
gets its own estimate, from its own replies.

``RttEstimator`` is pure (no clock, no I/O): ``sample(rtt)`` feeds one measured round
trip, ``rto(lo, hi, initial)`` is the current timeout, ``timed_out()`` backs it off.
RFC 6298 §2:

* first sample R: SRTT = R, RTTVAR = R/2;
* later samples R': RTTVAR = 3/4·RTTVAR + 1/4·|SRTT - R'| (with the old SRTT), then
  SRTT = 7/8·SRTT + 1/8·R';
* RTO = SRTT + max(G, 4·RTTVAR), clamped to [lo, hi]; before any sample, ``initial``
  (RFC: 1 s — what an unknown contact gets);
* on a timeout the RTO doubles (§5.5, exponential back-off, up to ``MAX_BACKOFF`` and
  never beyond ``hi``); the next valid sample resets the back-off (§5.7).

Karn's rule (§3) is the caller's part: a reply to a request that was sent more than once
(``rpc`` retransmits with the same request id) is ambiguous and is never sampled.
"""

from __future__ import annotations

ALPHA = 0.125          # SRTT gain (RFC 6298: 1/8)
BETA = 0.25            # RTTVAR gain (RFC 6298: 1/4)
K = 4.0                # RTTVAR multiplier
GRANULARITY = 0.001    # G: the event loop's clock is read to about a millisecond
MAX_BACKOFF = 64.0


class RttEstimator:
    """SRTT / RTTVAR / back-off of one peer (or of the whole node), see module."""

    __slots__ = ("backoff", "rttvar", "samples", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 1.0
        self.samples = 0

    def sample(self, rtt: float) -> None:
        """One measured round trip (seconds) of a request sent exactly once."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        self.backoff = 1.0
        self.samples += 1

    def base(self, initial: float) -> float:
        """SRTT + max(G, K·RTTVAR), unclamped and without back-off (``initial`` before
        any sample): what the peer's replies say, before policy."""
        if self.srtt is None:
            return initial
        return self.srtt + max(GRANULARITY, K * self.rttvar)

    def rto(self, lo: float, hi: float, initial: float) -> float:
        """The retransmission timeout: ``base`` clamped to [lo, hi], times the back-off,
        never beyond ``hi``."""
        return min(hi, max(lo, self.base(initial)) * self.backoff)

    def timed_out(self) -> None:
        """A request counted as lost: back off (RFC 6298 §5.5) until the next sample."""
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
