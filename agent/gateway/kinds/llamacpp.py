"""llama.cpp's ``llama-server``: ``GET /slots`` and, with ``--metrics``, ``GET /metrics``.

``/slots`` is a JSON array, one object per slot (``--parallel N``): newer servers say
``"is_processing": true|false``, older ones ``"state"`` (0 idle, else busy). Its length is
the server's capacity, the busy ones are running. ``/metrics`` adds
``llamacpp:requests_deferred`` (requests waiting for a slot),
``llamacpp:requests_processing`` and ``llamacpp:kv_cache_usage_ratio``. Either endpoint
can be switched off (``--no-slots``; no ``--metrics``): the server then answers 501
(or 404), and the poller stops asking for a while. Health: ``GET /health`` answers
``503 {"error": {"code": 503, "message": "Loading model", ...}}`` while the model loads,
``200 {"status": "ok"}`` once ready. Source: llama.cpp server README (examples/server,
tools/server).
"""

from __future__ import annotations

from agent.gateway.kinds.prom import samples
from agent.gateway.kinds.reading import (
    MAX_ITEMS,
    BadReading,
    Reading,
    count,
    json_body,
    ratio,
)

DEFERRED = "llamacpp:requests_deferred"
PROCESSING = "llamacpp:requests_processing"
KV = "llamacpp:kv_cache_usage_ratio"
WANTED = frozenset((DEFERRED, PROCESSING, KV))


def _busy(slot: object) -> bool:
    if not isinstance(slot, dict):
        raise BadReading("a slot is not an object")
    flag = slot.get("is_processing")
    if isinstance(flag, bool):
        return flag
    state = slot.get("state")
    if isinstance(state, int) and not isinstance(state, bool):
        return state != 0
    raise BadReading("a slot has neither is_processing nor state")


def parse_slots(body: bytes) -> Reading:
    slots = json_body(body)
    if not isinstance(slots, list) or not slots:
        raise BadReading("/slots is not a non-empty array")
    if len(slots) > MAX_ITEMS:
        raise BadReading(f"over {MAX_ITEMS} slots")
    return Reading(running=sum(1 for s in slots if _busy(s)), slots=len(slots))


def parse_metrics(body: bytes) -> Reading:
    found = samples(body, WANTED)
    if DEFERRED not in found and PROCESSING not in found:
        raise BadReading(f"no {DEFERRED} or {PROCESSING} in the metrics")
    return Reading(
        waiting=count(sum(found[DEFERRED]), DEFERRED) if DEFERRED in found else None,
        running=count(sum(found[PROCESSING]), PROCESSING) if PROCESSING in found else None,
        kv_cache=ratio(max(found[KV]), KV) if KV in found else None)
