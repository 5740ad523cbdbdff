"""A bounded reader of the Prometheus text exposition format (version 0.0.4).

Only what a kind asks for is parsed: for each wanted metric name, the values of its
samples (one per label set: vLLM labels by model and engine, Triton by model and
version). Lines of other metrics are skipped after a prefix test, so a 1 MiB answer
costs a few milliseconds. Comments (``# HELP``/``# TYPE``), timestamps and exemplars are
ignored; a wanted sample that does not parse makes the whole answer a
:class:`~agent.gateway.kinds.reading.BadReading` (a half-understood answer is not used).
"""

from __future__ import annotations

from agent.gateway.kinds.reading import BadReading, text

MAX_SAMPLES = 4096           # samples of the wanted metrics, at most


def _after_labels(rest: str) -> str:
    """``rest`` starts with ``{``: what follows the closing ``}`` (quotes and escapes in
    label values respected)."""
    quoted = escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = quoted
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return rest[i + 1:]
    raise BadReading("unterminated label set")


def samples(body: bytes, wanted: frozenset[str]) -> dict[str, list[float]]:
    """name -> the values of its samples, for each wanted name present."""
    out: dict[str, list[float]] = {}
    n = 0
    firsts = tuple({w[:6] for w in wanted})
    for line in text(body).splitlines():
        line = line.strip()
        if not line.startswith(firsts):
            continue
        end = len(line)
        for i, ch in enumerate(line):
            if ch in "{ \t":
                end = i
                break
        name = line[:end]
        if name not in wanted:
            continue
        rest = line[end:].lstrip(" \t")
        if rest.startswith("{"):
            rest = _after_labels(rest)
        parts = rest.split()
        if not parts:
            raise BadReading(f"{name}: no value")
        try:
            value = float(parts[0])
        except ValueError:
            raise BadReading(f"{name}: value {parts[0][:20]!r} is not a number") from None
        n += 1
        if n > MAX_SAMPLES:
            raise BadReading(f"over {MAX_SAMPLES} samples")
        out.setdefault(name, []).append(value)
    return out
