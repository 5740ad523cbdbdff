"""The demo's GPU services: one emulated inference server per worker, standing for the
model server a real box would run behind its gateway (``[gateway.upstreams]``).

Each is an :class:`agent.cli.demo_inference.InferenceServer`: as many slots as the
worker's ``max_concurrency``, a short FIFO queue, and lognormal service times whose mean
follows the worker's GPU class (the class scores of :mod:`agent.discovery.gpu_classes`:
an H100 answers in ~12 ms on average, a T4 in ~54 ms) — not a fixed sleep with unlimited
parallelism, which would make any routing look good. It serves vLLM's ``/metrics`` and
``/health`` like a real one, and its answer says who served::

    {"server": "worker-1", "id": 7, "queued_ms": 0.0, "service_ms": 9.8, "path": "/v1/run", "bytes": 0}

They run on one event loop in a background thread of the demo process, on 127.0.0.1.
"""

from __future__ import annotations

import zlib

from agent.cli.demo_inference import InferenceFarm, Profile
from agent.config import DEFAULT_GPU_SCORES
from agent.discovery.gpu_classes import GpuScorer

BASE_MS = 60.0
SIGMA = 0.5                  # service-time spread: p99 ~ 3x the median
QUEUE = 4                    # requests a server queues beyond its slots


def service_ms(gpu: str) -> float:
    """Mean milliseconds a request takes on this GPU class: better classes are faster."""
    score = GpuScorer(DEFAULT_GPU_SCORES).score(gpu, 0.0)
    return round(BASE_MS * max(0.1, 1.1 - score), 1)


class DemoServices:
    """The upstreams of all demo workers; ``add`` starts one and returns its URL."""

    def __init__(self) -> None:
        self._farm = InferenceFarm()

    def add(self, worker: str, gpu: str, slots: int = 4) -> str:
        return self._farm.add(Profile(name=worker, slots=max(1, slots), queue_limit=QUEUE,
                                      mean_ms=service_ms(gpu), sigma=SIGMA, cap_factor=5.0,
                                      seed=zlib.crc32(worker.encode()), model=f"demo/{gpu}"))

    def close(self) -> None:
        self._farm.close()
