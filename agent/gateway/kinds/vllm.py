"""vLLM: its scheduler's gauges at ``GET /metrics`` (Prometheus text).

``vllm:num_requests_waiting`` (queued), ``vllm:num_requests_running`` (in the running
batch) and ``vllm:kv_cache_usage_perc`` (0..1; ``vllm:gpu_cache_usage_perc`` before
v0.10). One sample per engine/model label set: counts are summed, the cache share is
the largest. Health: ``GET /health`` (200 ready, 503 when the engine is dead).
Sources: docs.vllm.ai "Production Metrics"; vllm/engine/metrics.py.
"""

from __future__ import annotations

from agent.gateway.kinds.prom import samples
from agent.gateway.kinds.reading import BadReading, Reading, count, ratio

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
WANTED = frozenset((WAITING, RUNNING, *KV))


def parse_metrics(body: bytes) -> Reading:
    found = samples(body, WANTED)
    if WAITING not in found and RUNNING not in found:
        raise BadReading(f"no {WAITING} or {RUNNING} in the metrics")
    kv = next((max(found[k]) for k in KV if k in found), None)
    return Reading(
        waiting=count(sum(found[WAITING]), WAITING) if WAITING in found else None,
        running=count(sum(found[RUNNING]), RUNNING) if RUNNING in found else None,
        kv_cache=ratio(kv, "kv cache usage") if kv is not None else None)
