"""A wide-area network model: regions, home access links, jitter and bursty loss.

Used by ``bench/scale.py --wan PROFILE`` (in-process nodes: every datagram is delivered
by ``loop.call_later`` at the sending transport) and by ``tests/netns/delayline.py`` (real
agent processes: every IP packet crossing the TUN delay line). One model for both, so
the figures of the benchmark and of the real-process test describe the same network.

Where the numbers come from
---------------------------
Inter-region round trips: the "Latency Between AWS Global Regions" table of average ping
round trips between EC2 instances (ms), as reproduced in "AWS Regions",
https://acomputerscientistlearnsaws.blogspot.com/2017/04/aws-regions.html (read through
this session's stored-pages search; no internet here). Both directions of a pair are
averaged. Same-region round trips (the table's 0) are set to 1 ms, the in-region figure
of cloudping.co's AWS matrix (e.g. af-south-1 -> af-south-1 0.96 ms), same search.

Home access links (the issue's figure): every node gets an access delay drawn uniformly
in 5-40 ms, which it adds to every round trip it takes part in (half on each way). So a
pair's RTT = region RTT + access(a) + access(b); two home boxes in the same city see
11-81 ms, Virginia to Tokyo ~190 ms.

Jitter: each datagram gets an extra one-way delay drawn from an exponential
distribution (mean ``jitter_ms``, capped at 5 x the mean) — queueing at home routers.

Loss (``global-lossy``): every access link runs a Gilbert-Elliott chain stepped once per
datagram that crosses it (good: 0.25 % loss; bad: 50 %; mean burst 5 datagrams; 1.5 % of
the time bad), so ~1 % per link and ~2 % end to end (a datagram crosses the sender's and
the receiver's link), part independent, most in bursts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# ---------------------------------------------------------------------------- source
# rows: from; columns: to, in REGIONS order; ms (average ping RTT, see the docstring)
REGIONS = ("us-east-1", "us-west-1", "us-west-2", "eu-west-1", "eu-central-1",
           "ap-northeast-1", "ap-northeast-2", "ap-southeast-1", "ap-southeast-2",
           "sa-east-1")
_TABLE = (
    (0, 72.74, 86.98, 80.55, 88.66, 145.3, 178.4, 216.7, 230, 119.5),
    (71.63, 0, 19.46, 153.2, 166.6, 102.5, 131.5, 174, 157.5, 192.7),
    (88.68, 19.2, 0, 137, 159.5, 89.1, 118.3, 161.4, 162.2, 182.7),
    (80.52, 153.2, 137, 0, 19.56, 212.4, 242.4, 239, 309.6, 191.3),
    (88.62, 166.6, 159.5, 19.55, 0, 236.5, 266.2, 325.9, 323.5, 194.9),
    (145.3, 102.5, 89.16, 212.4, 236.6, 0, 31.44, 73.79, 103.9, 256.8),
    (176.6, 132.6, 118.2, 242.4, 265.3, 31.32, 0, 71.87, 134, 286.3),
    (216.7, 173.9, 161.4, 238.1, 325.9, 73.81, 71.29, 0, 175.3, 328.1),
    (229.7, 157.8, 161.9, 309.6, 323.2, 103.9, 134, 175.4, 0, 322.5),
    # sa-east-1's own row is cut off in the source: its column is used (symmetric)
    (119.5, 192.7, 182.7, 191.3, 194.9, 256.8, 286.3, 328.1, 322.5, 0),
)
IN_REGION_RTT_MS = 1.0
SOURCE = ("AWS inter-region average ping RTTs, 'Latency Between AWS Global Regions' as "
          "tabled at acomputerscientistlearnsaws.blogspot.com/2017/04/aws-regions.html")


def region_rtt_ms(a: str, b: str) -> float:
    """Round trip between two regions, ms (mean of both directions of the table)."""
    i, j = REGIONS.index(a), REGIONS.index(b)
    if i == j:
        return IN_REGION_RTT_MS
    return (_TABLE[i][j] + _TABLE[j][i]) / 2


# ---------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    name: str
    regions: tuple[str, ...]
    access_ms: tuple[float, float]      # per node, added to each of its round trips
    jitter_ms: float                    # mean extra one-way delay per datagram
    loss: bool                          # Gilbert-Elliott loss on every access link
    lan_rtt_ms: float = 0.0             # "lan": one site, this RTT between any two nodes


PROFILES: dict[str, Profile] = {
    "lan": Profile("lan", ("lan",), (0.0, 0.0), 0.05, False, lan_rtt_ms=0.3),
    # North America: Virginia, N. California, Oregon
    "continent": Profile("continent", ("us-east-1", "us-west-1", "us-west-2"),
                         (5.0, 40.0), 2.0, False),
    "global": Profile("global", REGIONS, (5.0, 40.0), 3.0, False),
    "global-lossy": Profile("global-lossy", REGIONS, (5.0, 40.0), 3.0, True),
}


class GilbertElliott:
    """A two-state loss chain, stepped once per datagram crossing the link."""

    P_GOOD_TO_BAD = 0.015 * 0.2 / 0.985    # stationary share of bad = 1.5 %
    P_BAD_TO_GOOD = 0.2                    # mean burst: 5 datagrams
    LOSS_GOOD = 0.0025
    LOSS_BAD = 0.5

    __slots__ = ("bad",)

    def __init__(self) -> None:
        self.bad = False

    def drop(self, rnd: random.Random) -> bool:
        if self.bad:
            if rnd.random() < self.P_BAD_TO_GOOD:
                self.bad = False
        elif rnd.random() < self.P_GOOD_TO_BAD:
            self.bad = True
        return rnd.random() < (self.LOSS_BAD if self.bad else self.LOSS_GOOD)


class Wan:
    """Places ``n`` hosts (index 0..n-1) and answers, per datagram, its delay or a drop.

    Placement depends only on (profile, n, seed), so every process of a sharded run
    computes the same map; the per-datagram draws use ``rnd`` (per process)."""

    def __init__(self, profile: Profile, n: int, seed: int = 1,
                 regions: list[str] | None = None) -> None:
        self.profile = profile
        rng = random.Random(f"wan:{seed}")   # same placement for every profile
        self.region = regions if regions is not None else [
            profile.regions[i % len(profile.regions)] for i in range(n)]
        lo, hi = profile.access_ms
        self.access = [rng.uniform(lo, hi) / 1000 for _ in range(n)]
        names = sorted(set(self.region))
        self._rtt = {(a, b): (profile.lan_rtt_ms if profile.lan_rtt_ms
                              else region_rtt_ms(a, b)) / 1000
                     for a in names for b in names}
        self._links = [GilbertElliott() for _ in range(n)] if profile.loss else []
        self.rnd = random.Random(f"wan-draws:{seed}")
        self.sent = 0
        self.lost = 0

    def base_rtt(self, a: int, b: int) -> float:
        """The pair's round trip without jitter, s."""
        return self._rtt[(self.region[a], self.region[b])] + self.access[a] + self.access[b]

    def delay(self, a: int, b: int) -> float | None:
        """One datagram from host a to host b: its one-way delay in s, or None if lost."""
        self.sent += 1
        if self._links and (self._links[a].drop(self.rnd) or self._links[b].drop(self.rnd)):
            self.lost += 1
            return None
        j = self.profile.jitter_ms / 1000
        extra = min(5 * j, self.rnd.expovariate(1 / j)) if j > 0 else 0.0
        return self.base_rtt(a, b) / 2 + extra

    def rtt_stats(self, samples: int = 20000) -> dict[str, float]:
        """Median and p99 pairwise RTT (ms) over random distinct pairs, jitter included
        (its mean both ways), so every latency can be read in RTTs."""
        rng = random.Random(3)
        n = len(self.region)
        jit = 2 * self.profile.jitter_ms / 1000
        xs = []
        for _ in range(samples if n > 1 else 0):
            a, b = rng.randrange(n), rng.randrange(n)
            if a != b:
                xs.append(self.base_rtt(a, b) + jit)
        xs.sort()

        def q(p: float) -> float:
            return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))] * 1000 if xs \
                else float("nan")
        return {"median_rtt_ms": q(0.5), "p99_rtt_ms": q(0.99), "min_rtt_ms": q(0.0)}

    def loss_share(self) -> float:
        return self.lost / self.sent if self.sent else 0.0
