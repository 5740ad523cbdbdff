"""Hugging Face TGI: its router's gauges at ``GET /metrics`` (Prometheus text).

``tgi_queue_size`` (requests waiting), ``tgi_batch_current_size`` (requests in the
running batch); ``tgi_batch_current_max_tokens`` is a token budget, not a request
count, and is not used. Health: ``GET /health`` (200 healthy, 503 otherwise).
Source: huggingface.co/docs/text-generation-inference/reference/metrics.
"""

from __future__ import annotations

from agent.gateway.kinds.prom import samples
from agent.gateway.kinds.reading import BadReading, Reading, count

QUEUE = "tgi_queue_size"
BATCH = "tgi_batch_current_size"
WANTED = frozenset((QUEUE, BATCH))


def parse_metrics(body: bytes) -> Reading:
    found = samples(body, WANTED)
    if QUEUE not in found:
        raise BadReading(f"no {QUEUE} in the metrics")
    return Reading(waiting=count(sum(found[QUEUE]), QUEUE),
                   running=count(sum(found[BATCH]), BATCH) if BATCH in found else None)
