"""The dashboard's event log: who joined, moved, withdrew, expired, failed and recovered.

Kept always (cheap, no network), the last ``LOG_SIZE`` lines, each published on the
page's event channel as it happens (``log`` frames, replayed to a page that reconnects).
Sources: records the local DHT node stores (the ``"record"`` bus event), the membership
diffs of watched services (the DHT's view, not only local), the latency tracker's
back-offs, the ``"config"`` bus event and the agent's readiness.

Why it remembers so much: a line must name the worker ("gpu-7 recovered"), and a
back-off can outlast the worker's record (it went stale and was forgotten), so names are
kept apart from presence, bounded by ``MAX_PRESENT``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import events
from agent.dht.record import ALL_SERVICES
from agent.discovery.select import record_max_age

if TYPE_CHECKING:
    from agent.discovery.latency import LatencyTracker

LOG_SIZE = 200
MAX_PRESENT = 10_000


class EventLog:
    """The log lines, and what is needed to write them: presence, names, back-offs."""

    def __init__(self, channel: events.Channel,
                 watched_name: Callable[[bytes], str | None]) -> None:
        self.channel = channel
        self.items: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self._watched_name = watched_name      # a name from the watches' members
        # (service, worker id) -> its record (None: known through a watch)
        self._present: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._names: OrderedDict[bytes, str] = OrderedDict()   # worker id -> last name
        self._bans: set[bytes] = set()
        self._ready: tuple[bool, tuple[str, ...]] | None = None

    def log(self, kind: str, text: str, **extra: Any) -> None:
        item = {"t": round(time.time(), 3), "kind": kind, "text": text, **extra}
        eid = self.channel.publish("log", item)
        self.items.append({**item, "event_id": eid})

    # ------------------------------------------------------------------ presence
    def _remember_name(self, wid: bytes, name: Any) -> None:
        if isinstance(name, str) and name:
            self._names[wid] = name
            self._names.move_to_end(wid)
            while len(self._names) > MAX_PRESENT:
                self._names.popitem(last=False)

    def _mark(self, service: str, wid: bytes, rec: Any) -> bool:
        """Remember (service, worker) as present; True if it was not."""
        if rec is not None:
            self._remember_name(wid, rec.name)
        key = (service, wid)
        new = key not in self._present
        self._present[key] = rec
        self._present.move_to_end(key)
        while len(self._present) > MAX_PRESENT:
            self._present.popitem(last=False)
        return new

    def _unmark(self, service: str, wid: bytes) -> bool:
        """Forget (service, worker); True if it was present (its value may be None)."""
        key = (service, wid)
        if key not in self._present:
            return False
        del self._present[key]
        return True

    def name_of(self, wid: bytes) -> str:
        for (_svc, w), rec in self._present.items():
            if w == wid and rec is not None:
                return str(rec.name)
        return self._watched_name(wid) or self._names.get(wid) or wid.hex()[:12]

    # ------------------------------------------------------------------ sources
    def on_record(self, rec: Any) -> None:
        """A record stored locally: joins, moves and withdrawals as they arrive."""
        try:
            wid, services, withdrawn = rec.worker_id, tuple(rec.services), bool(rec.withdrawn)
            name = rec.name
        except AttributeError:
            return
        for svc in services:
            if withdrawn:
                if self._unmark(svc, wid):
                    self.log("withdrew", f"{name} withdrew from {svc}", service=svc,
                             worker=name, worker_id=wid.hex())
                continue
            old = self._present.get((svc, wid))
            if self._mark(svc, wid, rec):
                self.log("joined", f"{name} joined {svc} ({rec.gpu or 'no GPU'}, "
                         f"{rec.region or 'no region'})", service=svc, worker=name,
                         worker_id=wid.hex())
            elif old is not None and old.endpoint != rec.endpoint:
                self.log("moved", f"{name} moved to {rec.endpoint}", service=svc,
                         worker=name, worker_id=wid.hex())

    def on_member_change(self, service: str, kind: str, view: dict[str, Any],
                         reason: str) -> None:
        """Membership diffs of watched services (the DHT's view, not only local)."""
        if service == ALL_SERVICES:
            return
        wid = bytes.fromhex(view["id"])
        name = view.get("name", "")
        self._remember_name(wid, name)
        if kind == "added":
            if (service, wid) not in self._present and self._mark(service, wid, None):
                self.log("joined", f"{name} joined {service}", service=service,
                         worker=name, worker_id=view["id"])
        elif kind == "removed":
            if self._unmark(service, wid):
                verb = {"withdrawn": "withdrew from", "expired": "expired from",
                        "stale": "went stale in"}.get(reason, "left")
                kind_ = {"withdrawn": "withdrew", "expired": "expired",
                         "stale": "expired"}.get(reason, "left")
                self.log(kind_, f"{name} {verb} {service}"
                         + (f" ({reason})" if verb == "left" else ""),
                         service=service, worker=name, worker_id=view["id"])

    def on_config(self, cfg: Any) -> None:
        self.log("reload", f"configuration reloaded from {cfg.source or '?'}")

    # ------------------------------------------------------------------ every tick
    def check_ready(self, ok: bool, reasons: list[str], running: bool) -> None:
        """A line when readiness changes (not while the agent still starts)."""
        cur = (ok, tuple(reasons))
        if cur != self._ready and running:
            if self._ready is not None or not ok:
                self.log("ready" if ok else "not-ready",
                         "ready" if ok else "not ready: " + "; ".join(reasons))
            self._ready = cur

    def check_backoffs(self, tracker: LatencyTracker, now: float) -> None:
        """A line when a worker is backed off after failures, and when that ends."""
        bans = set(tracker.current_bans(now))
        for wid in bans - self._bans:
            st = tracker.get(wid)
            n = st.failures if st is not None else 0
            self.log("failing", f"worker {self.name_of(wid)} failed "
                     f"({n} in a row): backed off", worker_id=wid.hex())
        for wid in self._bans - bans:
            self.log("recovered", f"worker {self.name_of(wid)}: back-off over",
                     worker_id=wid.hex())
        self._bans = bans

    def check_expiry(self, now: float, max_age: float) -> None:
        """Records stored locally that expired or went stale by their own refresh (the
        rule lookups apply, ``select.record_max_age``)."""
        for (svc, wid), rec in list(self._present.items()):
            if rec is None:
                continue          # known through a watch: the watch reports its removal
            if rec.expires_at <= now or now - rec.issued_at > record_max_age(rec, max_age):
                self._unmark(svc, wid)
                self.log("expired", f"{rec.name} expired from {svc} (no refresh for "
                         f"{now - rec.issued_at:.0f} s)", service=svc, worker=rec.name,
                         worker_id=wid.hex())
