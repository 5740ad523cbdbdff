"""What an inference server says of itself: :class:`Reading`, and the shared parsing rules.

Every reader in this package is a pure function ``bytes -> Reading`` that raises only
:class:`BadReading` — on malformed, huge or hostile input it says why instead of failing
in some other way — so the gateway's poller can count a bad reading and go on with its
own counts (``agent.gateway.upstream_load``). Numbers are bounded (``MAX_COUNT``) so a
server that reports nonsense cannot push the ``RMA-Load`` header out of its grammar.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

MAX_BYTES = 1 << 20          # a body larger than this is not read (vLLM's /metrics: ~100 KB)
MAX_COUNT = 1_000_000        # requests a server may claim to hold, at most
MAX_ITEMS = 4096             # slots / models listed, at most
MAX_DEPTH = 32               # JSON nesting accepted


class BadReading(ValueError):
    """A server's answer that says nothing usable (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One server's own view of its load; None = it did not say."""

    waiting: int | None = None       # requests queued, not started
    running: int | None = None       # requests being processed
    slots: int | None = None         # requests it processes at once (its capacity)
    kv_cache: float | None = None    # KV-cache usage, 0..1
    models: int | None = None        # models loaded (Ollama's /api/ps)

    def over(self, base: Reading) -> Reading:
        """This reading's fields, ``base``'s where this one said nothing (two sources of
        one server, e.g. llama.cpp's /slots and /metrics)."""
        return Reading(**{f.name: (getattr(self, f.name) if getattr(self, f.name) is not None
                                   else getattr(base, f.name)) for f in fields(self)})

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


def count(value: float, what: str) -> int:
    """A reported number of requests/slots: finite, >= 0, at most ``MAX_COUNT``."""
    if not math.isfinite(value) or value < 0:
        raise BadReading(f"{what} is {value!r}")
    return min(round(value), MAX_COUNT)


def ratio(value: float, what: str) -> float:
    """A reported usage share: finite, clamped to 0..1."""
    if not math.isfinite(value):
        raise BadReading(f"{what} is {value!r}")
    return min(max(value, 0.0), 1.0)


def text(body: bytes) -> str:
    if len(body) > MAX_BYTES:
        raise BadReading(f"answer over {MAX_BYTES} bytes")
    return body.decode("utf-8", "replace")


def _depth_ok(body: str) -> bool:
    """Whether JSON nesting stays under ``MAX_DEPTH`` (a cheap bracket scan that ignores
    strings: an over-count only refuses, and ``json`` recursion is never reached)."""
    depth = 0
    for ch in body:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def json_body(body: bytes) -> Any:
    """The JSON value of a bounded answer (BadReading when it is none)."""
    raw = text(body)
    if not _depth_ok(raw):
        raise BadReading(f"JSON nested deeper than {MAX_DEPTH}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadReading(f"not JSON: {str(exc)[:80]}") from None
