"""Last-known-good lookup answers on disk, for a caller cut off from the DHT.

Why: the in-memory cache keeps a stale answer as a last resort, but a caller that
restarts while the network is split (or its UDP is filtered and the coordinators are
unreachable) has no memory at all and would answer "no workers" for every service. Here
each service's last usable answer is also written to ``<state_dir>/discovery-lastgood``:
the workers' *signed* records as received, with the time they were saved. When neither the
DHT nor any coordinator gives anything usable and nothing is cached, the lookup answers
from this copy, marked ``"source": "stale"`` with its age, instead of nothing.

Records are re-verified when read back (signature as of when each was issued: the copy is
old on purpose, so expiry is not held against it; the answer's age says how old it is),
so a tampered file yields nothing, never a forged worker. Bounded: at most
``MAX_SERVICES`` services x ``MAX_RECORDS`` records, written at most once per
``MIN_INTERVAL_S`` per service (atomically: temp file + rename), and files larger than
``MAX_FILE_BYTES`` are ignored.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack

from agent.dht.record import RecordError, WorkerRecord, decode_verified
from agent.fsutil import write_atomic

log = logging.getLogger("rma_agent.discovery")

FILE_NAME = "discovery-lastgood"
MAX_SERVICES = 256
MAX_RECORDS = 1000
MIN_INTERVAL_S = 30.0
MAX_FILE_BYTES = 32 * 1024 * 1024


class LastGood:
    """``service -> (saved_at, [signed record bytes])``, mirrored to one file."""

    def __init__(self, state_dir: Path | str | None, *,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir is not None else None
        self.min_interval_s = min_interval_s
        self._data: OrderedDict[str, tuple[float, list[bytes]]] | None = None
        self.writes = 0
        self.errors = 0

    # ------------------------------------------------------------------ file
    def _load_file(self) -> OrderedDict[str, tuple[float, list[bytes]]]:
        if self._data is not None:
            return self._data
        self._data = OrderedDict()
        if self.path is None:
            return self._data
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError("file too large")
            raw = msgpack.unpackb(self.path.read_bytes(), raw=False, strict_map_key=True,
                                  max_map_len=MAX_SERVICES, max_array_len=MAX_RECORDS + 2)
            if not isinstance(raw, dict):
                raise ValueError("not a map")
            for svc, entry in raw.items():
                if (isinstance(svc, str) and isinstance(entry, list) and len(entry) == 2
                        and isinstance(entry[0], float | int) and isinstance(entry[1], list)):
                    recs = [b for b in entry[1][:MAX_RECORDS] if type(b) is bytes]
                    self._data[svc] = (float(entry[0]), recs)
        except FileNotFoundError:
            pass
        except Exception as exc:  # a damaged copy is worth nothing, never fatal
            self.errors += 1
            log.warning("discovery: ignoring last-known-good copy %s: %s", self.path, exc)
            self._data = OrderedDict()
        return self._data

    def _write(self) -> None:
        if self.path is None or self._data is None:
            return
        body = msgpack.packb({s: [t, recs] for s, (t, recs) in self._data.items()},
                             use_bin_type=True)
        if not self.path.parent.is_dir():
            return  # the agent creates its state_dir; never create one ourselves
        try:
            write_atomic(self.path, body, mode=0o600)
            self.writes += 1
        except OSError as exc:
            self.errors += 1
            log.warning("discovery: cannot write last-known-good copy %s: %s", self.path, exc)

    # ------------------------------------------------------------------ API
    def save(self, service: str, records: list[Any], now: float | None = None) -> bool:
        """Remember ``records`` (objects with ``encode()``, live ones only) as the last
        good answer for ``service``; False when skipped (nothing to keep, too soon)."""
        now = time.time() if now is None else now
        encoded = [r.encode() for r in records
                   if hasattr(r, "encode") and not getattr(r, "withdrawn", False)
                   and getattr(r, "expires_at", 0) > now][:MAX_RECORDS]
        if not encoded:
            return False
        data = self._load_file()
        old = data.get(service)
        if old is not None and now - old[0] < self.min_interval_s:
            return False
        data[service] = (now, encoded)
        data.move_to_end(service)
        while len(data) > MAX_SERVICES:
            data.popitem(last=False)
        self._write()
        return True

    def load(self, service: str) -> tuple[list[WorkerRecord], float] | None:
        """The saved records of ``service`` (verified) and when they were saved."""
        entry = self._load_file().get(service)
        if entry is None:
            return None
        saved_at, blobs = entry
        out: list[WorkerRecord] = []
        for b in blobs:
            try:
                rec = WorkerRecord.decode(b)
                # signature and fields as of when the worker issued it: the copy is
                # deliberately old, its age is reported instead
                out.append(decode_verified(b, now=rec.issued_at))
            except RecordError:
                self.errors += 1
                continue
        return (out, saved_at) if out else None
