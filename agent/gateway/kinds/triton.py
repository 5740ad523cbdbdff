"""NVIDIA Triton: ``nv_inference_pending_request_count`` at its metrics endpoint.

The metrics live on their own port (``--metrics-port``, 8002 by default), so the
upstream's ``metrics_url`` names them, else ``http://<upstream host>:8002/metrics``.
The gauge is per model and version ("requests awaiting execution"): summed, it is the
server's queue. Triton publishes no count of requests executing. Readiness:
``GET /v2/health/ready`` (200 ready). Source: Triton user guide, "Metrics".
"""

from __future__ import annotations

import urllib.parse

from agent.gateway.kinds.prom import samples
from agent.gateway.kinds.reading import BadReading, Reading, count

PENDING = "nv_inference_pending_request_count"
WANTED = frozenset((PENDING,))
METRICS_PORT = 8002


def default_metrics_url(url: str) -> str:
    """``http://<host>:8002/metrics`` for an upstream at ``url``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{METRICS_PORT}/metrics"


def parse_metrics(body: bytes) -> Reading:
    found = samples(body, WANTED)
    if PENDING not in found:
        raise BadReading(f"no {PENDING} in the metrics")
    return Reading(waiting=count(sum(found[PENDING]), PENDING))
