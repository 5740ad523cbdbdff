"""NetworkComponent (component "network"): enforces a closed network's admission in a running agent.

What it does (docs/SECURITY.md has the trust model):

* holds the ``AdmissionPolicy`` built from ``network.admission_keys`` (empty = open
  network: said once in the log and as ``"network": {"closed": false}`` in
  ``/api/dht/stats``, and nothing is filtered);
* the DHT storage (``ProviderStorage.admit``), the coordinator's registry and every
  lookup (the DHT's and discovery's, cache and coordinator fallback included) ask
  ``check``/``admitted`` before keeping or offering a record;
* a worker loads ``worker.admission_cert`` and carries it in its record
  (``certificate_blob``); its problems (missing, unreadable, for another key, not
  covering the services, expired; expiring within 7 days as a warning) show in STATUS=,
  ``/readyz`` (a worker a closed network refuses is not ready) and the stats;
* revocation: a coordinator reads ``state_dir/revocations.list`` (the file
  ``rma-agent revoke`` writes; re-read when it changes), every agent serves the lists it
  knows at ``GET /api/network/revocations`` (``{"lists": [base64, ...]}``) and fetches
  them every ``REVOCATION_INTERVAL`` seconds from ``discovery.coordinators`` and the
  URL entries of ``dht.bootstrap``. A newer list purges the revoked workers from the local
  storage, the registry and the lookup cache at once, so a revoked worker is gone from
  every answer within one interval (+ a few seconds). Lists learned are kept in
  ``state_dir/revocations.known``: a restarted agent does not forget a revocation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from agent.admission.certificate import Certificate
from agent.admission.keys import AdmissionError, b64_key, read_b64_file
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.admission.settings import (
    NO_SOURCES,
    cert_path,
    certificate_state,
    configured_keys,
    revocation_sources,
    time_left,
)
from agent.component import Component, cancel_task
from agent.fsutil import write_atomic
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from agent.config import Config
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.network")
_LOG_LIMIT = RateLimiter(rate=1 / 60, burst=3)

REVOCATIONS_PATH = "/api/network/revocations"
LOCAL_LIST = "revocations.list"      # the operator's list (coordinators; any agent reads it)
KNOWN_LISTS = "revocations.known"    # lists learned from others, kept across restarts
ENV_INTERVAL = "RMA_AGENT_REVOCATION_INTERVAL"
REVOCATION_INTERVAL = 60.0           # seconds between fetches (jittered +-10 %)
FILE_CHECK_INTERVAL = 5.0            # how often the local list file's mtime is looked at
FETCH_TIMEOUT = 5.0
MAX_LISTS_BYTES = 2 * 1024 * 1024
MAX_LISTS = 16
MAX_SOURCES = 8


def revocation_interval() -> float:
    """``REVOCATION_INTERVAL``, or ``$RMA_AGENT_REVOCATION_INTERVAL`` (tests, drills)."""
    try:
        v = float(os.environ.get(ENV_INTERVAL, ""))
    except ValueError:
        return REVOCATION_INTERVAL
    return v if 1.0 <= v <= 3600.0 else REVOCATION_INTERVAL


def admitted(agent: Any, records: Iterable[Any]) -> list[Any]:
    """``records`` filtered by the agent's admission policy (unchanged when open)."""
    comp = agent.admission if agent is not None else None
    if comp is None:
        return list(records)
    return comp.admitted(records)


class NetworkComponent(Component):
    """Component "network": admission policy, worker certificate, revocation lists."""

    name = "network"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.policy = AdmissionPolicy(configured_keys(agent.config))
        self.refused: Counter[str] = Counter()
        self.cert_blob = b""
        self.cert_errors: list[str] = []
        self.cert_warnings: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._local_mtime: float | None = None
        self.interval = revocation_interval()
        self.fetches = Counter[str]()
        self.last_fetch_at: float | None = None
        self.last_change_at: float | None = None
        self.purged = 0
        self._load_known()
        self._check_local_file()
        registry = getattr(agent, "registry", None)
        if registry is not None:
            try:
                registry.register(_NetworkCollector(self))
            except ValueError as exc:    # duplicated names must not stop the agent
                log.warning("network: metrics not registered: %s", exc)

    # ------------------------------------------------------------------ policy API
    @property
    def closed(self) -> bool:
        return self.policy.closed

    def check(self, record: Any, now: float | None = None) -> str | None:
        """None when ``record`` is admitted, else why (counted by reason)."""
        why = self.policy.check(record, now)
        if why is not None:
            self.refused[why] += 1
        return why

    def admitted(self, records: Iterable[Any], now: float | None = None) -> list[Any]:
        if not self.policy.closed:
            return list(records)
        now = time.time() if now is None else now
        return [r for r in records if self.check(r, now) is None]

    def check_cert(self, blob: bytes, public_key: bytes, services: Iterable[str],
                   now: float | None = None) -> str | None:
        """Why the policy refuses certificate ``blob`` for ``public_key`` and
        ``services`` (chain, time, revocation); None when it admits them. Not counted:
        the enrollment endpoint asks it for renewals, not for records."""
        return self.policy.check_cert(blob, public_key, services, now)

    def storage_hook(self, record: Any, now: float) -> str | None:
        """``ProviderStorage.admit``: refusal reason or None."""
        return self.check(record, now) if self.policy.closed else None

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(REVOCATIONS_PATH, self.serve_revocations)

    def add_gateway_routes(self, app: web.Application) -> None:
        """Coordinators also serve the lists on their public listener (``gateway.listen``),
        where other agents' ``discovery.coordinators`` point."""
        if self.agent.config.agent.role == "coordinator":
            app.router.add_get(REVOCATIONS_PATH, self.serve_revocations)

    async def serve_revocations(self, request: web.Request) -> web.Response:
        """Every list this agent honours (its own file's and the ones it fetched)."""
        return web.json_response({
            "lists": [base64.b64encode(rl.encode()).decode() for rl in self.policy.lists.values()],
        })

    async def start(self) -> None:
        cfg = self.agent.config
        if not self.policy.closed:
            log.info("network: open (network.admission_keys is empty): any worker may "
                     "announce and be offered")
        else:
            log.info("network: closed: %d admission key(s), %d worker(s) revoked",
                     len(self.policy.keys), len(self.policy.revoked))
            if not revocation_sources(cfg) and cfg.agent.role == "worker":
                log.warning("network: %s", NO_SOURCES)
        self._load_certificate()
        if cfg.agent.role == "worker":
            for e in self.cert_errors:
                log.error("worker.admission_cert: %s", e)
            for w in self.cert_warnings:
                log.warning("worker.admission_cert: %s", w)
        if self.policy.closed:
            self._task = asyncio.create_task(self._loop(), name="network-revocations")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self, old: Config, new: Config) -> None:
        keys = configured_keys(new)
        if tuple(keys) != self.policy.keys:
            was = self.policy.closed
            self.policy.set_keys(keys)
            self._load_known()
            self._check_local_file(force=True)
            log.info("network: admission keys changed: now %s",
                     f"closed, {len(keys)} key(s)" if keys else "open")
            if self.policy.closed and not was and self._task is None:
                self._task = asyncio.create_task(self._loop(), name="network-revocations")
            self._apply()
        before = self.cert_blob
        self._load_certificate()
        for e in self.cert_errors:
            log.error("worker.admission_cert: %s", e)
        worker = self.agent.worker
        if self.cert_blob != before and worker is not None:
            worker.wake()                 # announce the new certificate now

    def _load_certificate(self) -> None:
        dht = self.agent.dht
        identity = dht.identity if dht is not None else None
        pk = identity.public_key if identity is not None else None
        self.cert_blob, self.cert_errors, self.cert_warnings = certificate_state(
            self.agent.config, pk)
        self.agent.status_changed()

    def certificate_blob(self) -> bytes:
        """What the worker puts in its record's ``cert`` field (b"" = none)."""
        return self.cert_blob

    def reload_certificate(self) -> bool:
        """Re-read ``worker.admission_cert`` (a renewal replaced the file); True when the
        certificate carried changed (the worker then re-announces with it)."""
        before = self.cert_blob
        self._load_certificate()
        return self.cert_blob != before

    # ------------------------------------------------------------------ revocations
    def _state(self, name: str) -> Path:
        return Path(self.agent.config.agent.state_dir) / name

    def _load_known(self) -> None:
        try:
            text = self._state(KNOWN_LISTS).read_text("ascii")
        except (OSError, UnicodeDecodeError):
            return
        for line in text.split()[:MAX_LISTS]:
            try:
                self.policy.add_list(RevocationList.decode(base64.b64decode(line, validate=True)))
            except (AdmissionError, binascii.Error, ValueError):
                continue

    def _save_known(self) -> None:
        data = "".join(base64.b64encode(rl.encode()).decode() + "\n"
                       for rl in self.policy.lists.values())
        path = self._state(KNOWN_LISTS)
        try:
            write_atomic(path, data.encode("ascii"), mode=0o644)
        except OSError as exc:
            _LOG_LIMIT.log(log, logging.WARNING, "save-known",
                           "network: cannot keep revocation lists in %s: %s", path, exc)

    def _check_local_file(self, force: bool = False) -> bool:
        """(Re-)read ``state_dir/revocations.list`` when its mtime changed."""
        path = self._state(LOCAL_LIST)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            self._local_mtime = None
            return False
        if mtime == self._local_mtime and not force:
            return False
        self._local_mtime = mtime
        try:
            rl = RevocationList.decode(read_b64_file(path, "revocation list", MAX_LISTS_BYTES))
        except AdmissionError as exc:
            log.error("network: %s: %s", path, exc)
            return False
        if rl.issuer not in self.policy.keys:
            log.error("network: %s is signed by %s, which is not in network.admission_keys",
                      path, b64_key(rl.issuer))
            return False
        return self._take(rl, str(path))

    def _take(self, rl: RevocationList, source: str) -> bool:
        old = self.policy.lists.get(rl.issuer)
        if old is not None and old.seq >= rl.seq:
            return False
        before = self.policy.revoked
        self.policy.add_list(rl)
        added = self.policy.revoked - before
        log.info("network: revocation list from %s (seq %d, %d revoked, %d new) via %s",
                 b64_key(rl.issuer)[:12], rl.seq, len(rl.revoked), len(added), source)
        self._save_known()
        return True

    def sources(self) -> list[str]:
        """Base URLs to fetch lists from: ``discovery.coordinators`` and the URL entries
        of ``dht.bootstrap`` (their scheme and host)."""
        out = revocation_sources(self.agent.config)
        own = self.agent.http_url.rstrip("/") if getattr(self.agent, "http_url", "") else ""
        return [b for b in out if b != own][:MAX_SOURCES]

    async def _fetch_one(self, base: str) -> list[RevocationList] | None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "rma-agent-network"})
        try:
            async with self._session.get(
                    base + REVOCATIONS_PATH, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_LISTS_BYTES + 1)
            if len(body) > MAX_LISTS_BYTES:
                raise ValueError("answer too large")
            data = json.loads(body)
            items = data.get("lists") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise ValueError("no 'lists' array")
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.fetches["failed"] += 1
            _LOG_LIMIT.log(log, logging.WARNING, f"fetch:{base}",
                           "network: cannot fetch revocation lists from %s: %s", base,
                           str(exc) or type(exc).__name__)
            return None
        out = []
        for item in items[:MAX_LISTS]:
            try:
                if not isinstance(item, str):
                    raise AdmissionError("not a base64 string")
                out.append(RevocationList.decode(base64.b64decode(item, validate=True)))
            except (AdmissionError, binascii.Error, ValueError):
                self.fetches["bad_lists"] += 1
        self.fetches["ok"] += 1
        return out

    async def refresh(self) -> bool:
        """One round: the local file, then every source. True when something changed
        (and was applied)."""
        changed = self._check_local_file()
        srcs = self.sources()
        if srcs:
            results = await asyncio.gather(*(self._fetch_one(b) for b in srcs))
            self.last_fetch_at = time.time()
            for base, lists in zip(srcs, results, strict=True):
                for rl in lists or ():
                    if rl.issuer in self.policy.keys and self._take(rl, base):
                        changed = True
        if changed:
            self._apply()
        return changed

    def _apply(self) -> None:
        """Drop what the policy no longer admits from the storage and the registry, and
        forget cached lookup answers (they may name a revoked worker)."""
        self.last_change_at = time.time()
        self.purge()
        disc = self.agent.discovery
        if disc is not None:
            disc.forget_answers()
        self.agent.status_changed()

    def purge(self, now: float | None = None) -> int:
        """Remove records the policy refuses from the local DHT storage and the
        coordinator registry (revoked workers, expired certificates)."""
        if not self.policy.closed:
            return 0
        now = time.time() if now is None else now
        n = 0
        dht = self.agent.dht
        storage = dht.storage if dht is not None else None
        if storage is not None:
            n += storage.drop_where(lambda r: self.policy.check(r, now) is not None)
        coord = self.agent.coordinator
        if coord is not None:
            n += coord.drop_where(lambda r: self.policy.check(r, now) is not None)
        if n:
            self.purged += n
            log.info("network: dropped %d record(s) no longer admitted", n)
        return n

    async def _loop(self) -> None:
        next_fetch = 0.0
        while True:
            try:
                if time.monotonic() >= next_fetch:
                    if not await self.refresh() and self.purge():
                        self._apply()      # certificates expired since the last round
                    next_fetch = time.monotonic() + self.interval * random.uniform(0.9, 1.1)
                elif self._check_local_file():
                    self._apply()
            except asyncio.CancelledError:
                raise
            except Exception as exc:      # a round that fails is retried, never fatal
                _LOG_LIMIT.log(log, logging.WARNING, "loop",
                               "network: revocation round failed: %r", exc)
            await asyncio.sleep(min(FILE_CHECK_INTERVAL, self.interval))

    # ------------------------------------------------------------------ status
    def ready(self) -> tuple[bool, str]:
        if self.policy.closed and self.agent.config.agent.role == "worker" and self.cert_errors:
            return False, f"admission: {self.cert_errors[0]}"
        return True, ""

    def status(self) -> str:
        if not self.policy.closed:
            return ""
        if self.agent.config.agent.role == "worker":
            if self.cert_errors:
                return "NOT ADMITTED (see worker.admission_cert)"
            if self.cert_warnings and self.cert_blob:
                try:
                    left = Certificate.decode(self.cert_blob).not_after - time.time()
                except AdmissionError:
                    left = 0.0
                return f"admission cert EXPIRES in {time_left(max(left, 0.0))}"
            return "admitted"
        return f"closed network, {len(self.policy.revoked)} revoked"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "closed": self.policy.closed,
            "admission_keys": [b64_key(k) for k in self.policy.keys],
            "revoked": len(self.policy.revoked),
            "revocation_lists": [rl.to_json() for rl in self.policy.lists.values()],
            "revocation_interval_s": self.interval,
            "fetches": dict(self.fetches),
            "last_fetch_at": self.last_fetch_at,
            "last_change_at": self.last_change_at,
            "refused": dict(self.refused),
            "purged": self.purged,
        }
        if self.agent.config.agent.role == "worker":
            cert: dict[str, Any] = {"path": cert_path(self.agent.config),
                                    "carried": bool(self.cert_blob),
                                    "errors": self.cert_errors, "warnings": self.cert_warnings}
            if self.cert_blob:
                try:
                    cert.update(Certificate.decode(self.cert_blob).to_json())
                except AdmissionError:
                    pass
            out["certificate"] = cert
        return {"network": out}


class _NetworkCollector:
    """``rma_agent_network_*`` read at scrape time from the component's counters."""

    def __init__(self, comp: NetworkComponent) -> None:
        self.comp = comp

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.comp
        yield GaugeMetricFamily("rma_agent_network_closed",
                                "1 when network.admission_keys makes this a closed network",
                                value=1 if c.policy.closed else 0)
        yield GaugeMetricFamily("rma_agent_network_revoked",
                                "Worker keys on the revocation lists this agent honours",
                                value=len(c.policy.revoked))
        refused = CounterMetricFamily("rma_agent_network_refused",
                                      "Records refused by the admission policy, by reason",
                                      labels=["reason"])
        for reason, n in sorted(c.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        fetches = CounterMetricFamily("rma_agent_network_revocation_fetches",
                                      "Revocation list fetches, by outcome", labels=["result"])
        for result, n in sorted(c.fetches.items()):
            fetches.add_metric([result], n)
        yield fetches


def admitted_reason(agent: Any, record: Any) -> str | None:
    """Why the agent's admission policy refuses ``record``; None when admitted/open."""
    comp = agent.admission if agent is not None else None
    return None if comp is None else comp.check(record)
