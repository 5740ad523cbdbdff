"""Ollama: no queue metric; ``GET /api/ps`` lists the models loaded, and a full queue
shows as ``503`` on a request.

Ollama queues requests itself (``OLLAMA_MAX_QUEUE``, 512 by default) and answers
``503 {"error": "server busy, please try again.  maximum pending requests exceeded"}``
beyond that: the gateway then counts the server as full for a while
(``agent.gateway.upstream_load.FULL_HOLD_S``). ``/api/ps`` says how many models are in
memory (``{"models": [{"name", "model", "size", "size_vram", "expires_at", ...}]}``),
which is shown in the stats but is not load. Health: ``GET /api/version`` (200
``{"version": "..."}``). Sources: docs.ollama.com/api/ps; ollama PR #4144 (503 on a full
queue).
"""

from __future__ import annotations

from agent.gateway.kinds.reading import MAX_ITEMS, BadReading, Reading, json_body


def parse_ps(body: bytes) -> Reading:
    doc = json_body(body)
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        raise BadReading('/api/ps has no "models" array')
    if len(models) > MAX_ITEMS:
        raise BadReading(f"over {MAX_ITEMS} models")
    return Reading(models=len(models))
