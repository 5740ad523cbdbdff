"""The DHT's Prometheus metrics and the lookup/announce counters behind them.

Why a collector and not Counter objects: the protocol keeps plain counters (it is shared
by many nodes in one test process and must not know about registries); the numbers are
read when /metrics is scraped, so nothing is updated twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.dht.server import DHTNode

LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class DHTCounters:
    """What the component counts of its own lookups and announces."""

    lookups: int = 0
    lookup_hits: int = 0
    lookup_errors: int = 0
    announces: int = 0
    announce_failures: int = 0
    lookup_sum: float = 0.0
    lookup_hist: list[int] = field(default_factory=lambda: [0] * (len(LOOKUP_BUCKETS) + 1))
    lookup_times: list[float] = field(default_factory=list)   # last <= 512 durations (s)

    def note_lookup(self, dt: float) -> None:
        self.lookup_sum += dt
        for i, bound in enumerate(LOOKUP_BUCKETS):
            if dt <= bound:
                self.lookup_hist[i] += 1
                break
        else:
            self.lookup_hist[-1] += 1
        self.lookup_times.append(dt)
        if len(self.lookup_times) > 512:
            del self.lookup_times[:256]

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile of recent lookup durations, in ms (None before any)."""
        if not self.lookup_times:
            return None
        xs = sorted(self.lookup_times)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)


class DHTView(Protocol):
    """What the collector reads (``DHTComponent`` is one)."""

    node: DHTNode | None
    mode: str
    counters: DHTCounters

    @property
    def joined(self) -> bool: ...

    def peers(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...


class DHTCollector:
    """Prometheus collector reading the live node at scrape time.

    Why a collector and not Counter objects: the protocol keeps plain counters (it is
    shared by many nodes in one test process and must not know about registries); the
    numbers are read when /metrics is scraped, so nothing is updated twice.
    """

    def __init__(self, dht: DHTView) -> None:
        self.dht = dht

    def describe(self) -> list[Any]:
        return []      # no name claims at registration; names are checked by tests instead

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        d = self.dht
        stats = d.stats()
        yield GaugeMetricFamily("rma_agent_dht_peers", "Contacts in the routing table",
                                value=d.peers())
        yield GaugeMetricFamily("rma_agent_dht_joined", "1 once joined to the DHT",
                                value=1 if d.joined else 0)
        yield GaugeMetricFamily("rma_agent_dht_records",
                                "Provider records stored on this node",
                                value=_num(stats.get("records_stored")))
        mode = GaugeMetricFamily("rma_agent_dht_mode", "DHT mode in force", labels=["mode"])
        for m in ("server", "client"):
            mode.add_metric([m], 1 if d.mode == m else 0)
        yield mode
        drops = CounterMetricFamily("rma_agent_dht_dropped_datagrams",
                                    "Datagrams dropped by the protocol, by reason",
                                    labels=["reason"])
        for reason, n in sorted(_as_dict(stats.get("drops", stats.get("dropped"))).items()):
            drops.add_metric([str(reason)], _num(n))
        yield drops
        # hostile-peer defences (agent/dht/diversity.py, flood_gate.py, storage.py)
        node = d.node
        yield CounterMetricFamily("rma_agent_dht_diversity_refused",
                                  "Contacts refused by the per-IP and per-/24 routing limits",
                                  value=_num(stats.get("diversity_refused")))
        yield CounterMetricFamily("rma_agent_dht_token_challenges",
                                  "Requests answered with a write-token challenge",
                                  value=_num(_as_dict(stats.get("guard")).get("challenges")))
        yield CounterMetricFamily("rma_agent_dht_records_evicted",
                                  "Records of flooding hosts evicted to make room",
                                  value=node.storage.evicted if node is not None else 0)
        rpc = _as_dict(stats.get("rpc"))
        for key, help_text in (("sent", "RPC requests sent"), ("received", "RPC requests received"),
                               ("timeouts", "RPC requests that timed out"),
                               ("failed", "RPC requests that failed")):
            fam = CounterMetricFamily(f"rma_agent_dht_rpc_{key}", help_text, labels=["rpc"])
            for name, n in sorted(_as_dict(rpc.get(key)).items()):
                fam.add_metric([str(name)], _num(n))
            yield fam
        # links with loss and delay (agent/dht/rtt.py, rpc.py, liveness.py)
        for key, name, help_text in (
                ("retransmissions", "rpc_retransmissions",
                 "RPC requests sent again after their timeout (same request id)"),
                ("lost_requests", "rpc_lost",
                 "RPC requests unanswered after every retransmission"),
                ("removed_contacts", "contacts_removed",
                 "Contacts removed from the routing table by the failure rule"),
                ("false_deaths", "contacts_false_deaths",
                 "Removed contacts that answered again within the false-death window")):
            yield CounterMetricFamily(f"rma_agent_dht_{name}", help_text,
                                      value=_num(stats.get(key)))
        c = d.counters
        yield CounterMetricFamily("rma_agent_dht_announces", "Announces made by this node",
                                  value=c.announces)
        yield CounterMetricFamily("rma_agent_dht_announce_failures",
                                  "Announces that stored on no node", value=c.announce_failures)
        yield CounterMetricFamily("rma_agent_dht_lookups", "Provider lookups made by this node",
                                  value=c.lookups)
        buckets: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(LOOKUP_BUCKETS, c.lookup_hist, strict=False):
            acc += n
            buckets.append((repr(bound), acc))
        acc += c.lookup_hist[-1]
        buckets.append(("+Inf", acc))
        yield HistogramMetricFamily("rma_agent_dht_lookup_seconds", "Provider lookup duration",
                                    buckets=buckets, sum_value=c.lookup_sum)


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0
