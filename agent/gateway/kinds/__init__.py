"""Upstream kinds: how to read an inference server's own health and load.

``[gateway.upstreams]`` entries name a ``kind`` (``agent.config.upstreams``); for every
kind but ``generic`` the gateway polls the server's own endpoints (the :data:`SOURCES`
of its kind, at the root of the upstream's origin) and merges what they say with its
own in-flight count (``agent.gateway.upstream_load``). One module per server:

- ``vllm``     — ``/metrics``: waiting, running, KV-cache usage
- ``llamacpp`` — ``/slots`` (running, slots) and ``/metrics`` (deferred = waiting)
- ``tgi``      — ``/metrics``: queue size, current batch size
- ``triton``   — its metrics port (``metrics_url``, default :8002): pending requests
- ``ollama``   — ``/api/ps`` (models loaded); a 503 on a request = queue full

``reading`` holds :class:`Reading` and the bounded-input rules, ``prom`` the Prometheus
text reader. Readiness is each kind's health endpoint (``agent.config.model.KIND_HEALTH``)
judged by :func:`health_verdict`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from agent.config.model import Upstream
from agent.gateway.kinds import llamacpp, ollama, tgi, triton, vllm
from agent.gateway.kinds.reading import MAX_BYTES, BadReading, Reading

__all__ = ["MAX_BYTES", "SOURCES", "BadReading", "Reading", "Source", "health_verdict",
           "read", "source_url"]


@dataclass(frozen=True, slots=True)
class Source:
    """One endpoint a kind's load is read from."""

    name: str                              # "metrics" | "slots" | "ps"
    path: str                              # at the server's root
    parse: Callable[[bytes], Reading]
    optional: bool = False                 # 404/501: switched off there, not an error


SOURCES: dict[str, tuple[Source, ...]] = {
    "generic": (),
    "vllm": (Source("metrics", "/metrics", vllm.parse_metrics),),
    "llamacpp": (Source("slots", "/slots", llamacpp.parse_slots, optional=True),
                 Source("metrics", "/metrics", llamacpp.parse_metrics, optional=True)),
    "tgi": (Source("metrics", "/metrics", tgi.parse_metrics),),
    "ollama": (Source("ps", "/api/ps", ollama.parse_ps),),
    "triton": (Source("metrics", "/metrics", triton.parse_metrics),),
}


def source_url(up: Upstream, source: Source) -> str:
    """Where ``source`` of ``up`` is read: ``metrics_url`` for metrics when configured
    (Triton: its metrics port by default), else the path at the server's root."""
    if source.name == "metrics":
        if up.metrics_url:
            return up.metrics_url
        if up.kind == "triton":
            return triton.default_metrics_url(up.url)
    return up.origin + source.path


def read(source: Source, body: bytes) -> Reading | str:
    """The reading in ``body``, or why there is none — never an exception: a reader
    bug or hostile input must not reach the gateway."""
    try:
        return source.parse(body)
    except BadReading as exc:
        return str(exc) or "bad reading"
    except Exception as exc:            # a bug in a reader: counted like bad input
        return f"{source.name}: {type(exc).__name__}"


def _message(body: bytes) -> str:
    """A short printable reason from an error body: llama.cpp's and OpenAI's
    ``{"error": {"message"}}``, Ollama's ``{"error": "..."}``, ``{"message"}``,
    ``{"status"}``, else the text itself."""
    raw = body[:4096].decode("utf-8", "replace").strip()
    try:
        doc = json.loads(raw) if raw[:1] in ("{", "[") else raw
    except (ValueError, RecursionError):
        doc = raw
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            err = err.get("message")
        doc = next((v for v in (err, doc.get("message"), doc.get("status"))
                    if isinstance(v, str) and v), "")
    text = doc if isinstance(doc, str) else ""
    return "".join(c if c.isprintable() else " " for c in text)[:120].strip()


def health_verdict(status: int, body: bytes) -> str:
    """A kind's health answer judged: "" when ready (2xx), else why not — the status
    and the server's own words (llama.cpp: "HTTP 503: Loading model")."""
    if 200 <= status < 300:
        return ""
    msg = _message(body)
    return f"HTTP {status}" + (f": {msg}" if msg else "")
