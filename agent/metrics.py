"""Prometheus metrics of one agent.

Each ``Agent`` owns a ``CollectorRegistry`` (not the global default) so that several
agents can live in one process (tests, benchmarks) without name clashes. Components
register their own metrics against ``agent.registry``; names start with ``rma_agent_``.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import __version__

__all__ = ["CONTENT_TYPE_LATEST", "CoreMetrics", "render"]


def kernels_implementation() -> str:
    """'cython' or 'python' (the twins), as chosen by ``_fast`` at import."""
    try:
        import _fast
    except Exception:  # the agent must run even if the kernels package is broken
        return "python"
    return str(getattr(_fast, "IMPLEMENTATION", "python"))


class CoreMetrics:
    """Metrics the lifecycle itself owns."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        self.build_info = Gauge(
            "rma_agent_build_info", "Build information (value is always 1)",
            ["version", "python", "kernels"], registry=registry)
        self.build_info.labels(__version__, platform.python_version(),
                               kernels_implementation()).set(1)
        self.up = Gauge("rma_agent_ready", "1 when /readyz answers 200", registry=registry)
        self.start_time = Gauge("rma_agent_start_time_seconds",
                                "Unix time the agent started", registry=registry)
        self.start_time.set_to_current_time()
        self.reloads = Gauge("rma_agent_config_reloads", "Reloads by result",
                             ["result"], registry=registry)
        self.role = Gauge("rma_agent_role_info", "Role of this agent", ["role"],
                          registry=registry)
        self.role.labels(role).set(1)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
