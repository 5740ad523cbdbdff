"""The ``RMA-Load`` answer header (SPEC §5): a worker's load, fresh, on every answer.

Why a header and not only the record: a worker's record is republished every
``dht.republish_interval`` (30 s), so a router that ranks on it sends every caller to the
same "free" worker until the next record (herding). Every answer of a worker's gateway —
proxied answers, its own 503s and errors, the ownership proof — carries its load as of
that answer, so a router learns it for free on each request it sends.

Grammar (the contract; written by :func:`format_load`, read by :func:`parse_load`)::

    RMA-Load   = pair *( ";" pair )          ; optional spaces/tabs around ";" and "="
    pair       = key "=" 1*9DIGIT            ; a non-negative decimal integer
    key        = lowercase letter, then lowercase letters, digits, "_" or "-"

Known keys: ``inflight`` (requests being processed), ``queue`` (requests waiting, at the
gateway or in the upstream's own queue), ``capacity`` (requests it takes at once). All
three must be present, each once; unknown keys are ignored (room to grow). Anything else
— an empty value, a sign, a fraction, a duplicate key, over ``MAX_LEN`` characters — makes
the whole header malformed: the reader ignores it (and counts it), never fails on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADER = "RMA-Load"
MAX_LEN = 256                    # longer values are malformed (nothing legitimate is)
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NUM = re.compile(r"[0-9]{1,9}")
KNOWN = ("inflight", "queue", "capacity")


@dataclass(frozen=True, slots=True)
class Load:
    """One worker's load at one moment."""

    inflight: int
    queue: int
    capacity: int

    @property
    def busy(self) -> int:
        """Requests the worker holds: processing plus waiting."""
        return self.inflight + self.queue

    @property
    def full(self) -> bool:
        """A new request would wait (or be refused): no free slot."""
        return self.capacity > 0 and self.busy >= self.capacity


def format_load(load: Load) -> str:
    """The header value for ``load``: ``inflight=N; queue=N; capacity=N``."""
    return f"inflight={load.inflight}; queue={load.queue}; capacity={load.capacity}"


def parse_load(value: str | None) -> Load | None:
    """The :class:`Load` in a header value; None when absent or malformed (strict: see
    the module docstring; the caller counts the malformed ones)."""
    if value is None or len(value) > MAX_LEN:
        return None
    seen: dict[str, int] = {}
    names: set[str] = set()
    for part in value.split(";"):
        key, eq, num = part.partition("=")
        key, num = key.strip(" \t"), num.strip(" \t")
        if not eq or not _KEY.fullmatch(key) or not _NUM.fullmatch(num) or key in names:
            return None
        names.add(key)
        if key in KNOWN:
            seen[key] = int(num)
    if len(seen) != len(KNOWN):
        return None
    return Load(seen["inflight"], seen["queue"], seen["capacity"])
