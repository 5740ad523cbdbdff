"""The worker's certificate renewal client (issue 18 item 5, client side).

An enrolled worker's certificate is short-lived (days); nobody should have to re-admit a
box by hand. So the worker renews it itself, ACME-style:

* **when**: once a third of the certificate's lifetime is left
  (``enrollment.renew_at``), so a renewal that fails has the whole last third to be
  retried before anything expires;
* **from whom**: ``discovery.coordinators`` and the coordinators named by the URL entries
  of ``dht.bootstrap`` (what ``rma-agent join`` writes), one after the other, starting
  with the one that answered last time;
* **how**: ``POST /api/network/enroll`` with the current certificate, signed by the
  identity key (proof of possession; ``enrollment.build_renew_request``). A revoked key
  is refused there, so a revoked worker cannot renew its way back in;
* **failures**: exponential back-off with jitter, scaled to the certificate's lifetime
  (from 30 s for a week-long one, at most a tenth of the lifetime and 10 min),
  ``Retry-After`` honoured; every failure is
  counted and the journal warns, rate-limited (a few lines, then one a minute), naming
  what failed and how long the certificate has left;
* **install**: the new certificate is written atomically over ``worker.admission_cert``
  (state_dir, writable under the unit's sandboxing), then ``install()`` -- the admission
  component re-reads the file and the worker re-announces at once, so records carry the
  new certificate long before the old one expires: no restart, no gap.

The file is re-read every round, so a certificate an operator drops in by hand (``rma-agent
admit``) is picked up too, and its renewal scheduled from its own lifetime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.admission.keys import AdmissionError
from agent.component import cancel_task
from agent.fsutil import write_atomic
from agent.ratelimit import RateLimiter

log = logging.getLogger("rma_agent.network")

HTTP_TIMEOUT = 10.0
MAX_WAIT = 60.0             # the file is looked at again at least this often
BACKOFF_MAX = 600.0
MAX_ANSWER = 16384


@dataclass
class RenewalState:
    """What stats, STATUS= and ``rma-agent status`` show about renewal."""

    state: str = "idle"            # idle | waiting | renewing | failing | no certificate
    not_after: int | None = None
    renew_at: int | None = None
    renewals: int = 0
    failures: int = 0              # consecutive, reset by a success
    failures_total: int = 0
    last_ok_at: float | None = None
    last_error: str = ""
    last_source: str = ""
    next_attempt_at: float | None = None
    by_result: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "not_after": self.not_after, "renew_at": self.renew_at,
                "renewals": self.renewals, "failures": self.failures,
                "failures_total": self.failures_total, "last_ok_at": self.last_ok_at,
                "last_error": self.last_error, "last_source": self.last_source,
                "next_attempt_at": self.next_attempt_at, "by_result": dict(self.by_result)}


def backoff(failures: int, lifetime: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds before attempt ``failures + 1``: doubling from a thousandth of the
    lifetime (0.1 s to 30 s), capped at a tenth of the lifetime and at 10 min, then
    "equal jitter" (half fixed, half random) so a fleet that failed together does not
    retry together. A week-long certificate: 30 s, 1 min, 2 min ... 10 min."""
    base = min(30.0, max(0.1, lifetime / 1000))
    cap = max(base, min(BACKOFF_MAX, lifetime / 10))
    delay = min(cap, base * 2 ** max(failures - 1, 0))
    return delay / 2 + rng() * delay / 2


class CertRenewer:
    """Keeps ``cert_path`` renewed (see the module docstring). ``sources()`` gives the
    coordinator base URLs, ``network_keys()`` the keys a new certificate must chain to,
    ``install()`` makes the running agent carry the new file."""

    def __init__(self, *, cert_path: Path, identity: Any, sources: Callable[[], list[str]],
                 network_keys: Callable[[], tuple[bytes, ...]], install: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.cert_path = Path(cert_path)
        self.identity = identity
        self.sources = sources
        self.network_keys = network_keys
        self.install = install
        self.clock = clock
        self.state = RenewalState()
        self._preferred = 0
        self._blob = b""
        self._warn = RateLimiter(rate=1 / 60, burst=3)   # a few lines, then one a minute
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Forever: wait for the renewal time, renew, back off on failure."""
        try:
            while True:
                delay = await self._round()
                await asyncio.sleep(delay)
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def _round(self) -> float:
        """One step; seconds until the next."""
        cert, blob = self._read()
        if cert is None:
            self.state.state = "no certificate"
            return MAX_WAIT
        from agent.admission.enrollment import renew_at

        if blob != self._blob:            # renewed, or replaced by hand: a fresh start
            self._blob = blob
            self.state.failures = 0
        now = self.clock()
        self.state.not_after, self.state.renew_at = cert.not_after, renew_at(cert)
        wait = self.state.renew_at - now
        if wait > 0 and self.state.failures == 0:
            self.state.state = "waiting"
            self.state.next_attempt_at = float(self.state.renew_at)
            return min(wait, MAX_WAIT)
        self.state.state = "renewing"
        retry_after = await self.renew_once(cert, blob)
        if retry_after is None:
            return 0.0                    # renewed: schedule from the new certificate
        lifetime = float(cert.not_after - cert.not_before)
        delay = max(backoff(self.state.failures, lifetime), min(retry_after, BACKOFF_MAX))
        self.state.state = "failing"
        self.state.next_attempt_at = now + delay
        return delay

    def _read(self) -> tuple[Any, bytes]:
        from agent.admission import certificate as certmod

        limit = getattr(certmod, "MAX_CHAIN_BYTES", certmod.MAX_CERT_BYTES)
        try:
            from agent.admission.keys import read_b64_file
            blob = read_b64_file(self.cert_path, "certificate", limit)
            return certmod.Certificate.decode(blob), blob
        except AdmissionError as exc:
            self._warn.log(log, logging.WARNING, "renewal-read",
                      "network: certificate renewal: cannot read %s: %s", self.cert_path, exc)
            return None, b""

    # ------------------------------------------------------------------ one attempt
    async def renew_once(self, cert: Any, blob: bytes) -> float | None:
        """Ask each source in turn; None once one renewed (installed), else the
        Retry-After seconds to respect (0 when none was given)."""
        from agent.admission.enrollment import EnrollError

        sources = self.sources()
        if not sources:
            self._failed(cert, "no coordinator to renew from (discovery.coordinators is "
                         "empty)", "no_source")
            return 0.0
        order = sources[self._preferred % len(sources):] + sources[:self._preferred % len(sources)]
        retry_after = 0.0
        errors = []
        for base in order:
            try:
                new_blob, text = await self._ask(base, blob)
            except EnrollError as exc:
                retry_after = max(retry_after, exc.retry_after or 0.0)
                errors.append(f"{base}: {exc}")
                self.state.by_result[_result(exc)] = self.state.by_result.get(_result(exc), 0) + 1
                continue
            self._install(new_blob, text, base)
            self._preferred = sources.index(base)
            return None
        self._failed(cert, "; ".join(errors), None)
        return retry_after

    async def _ask(self, base: str, blob: bytes) -> tuple[bytes, str]:
        from agent.admission.enrollment import (
            ENROLL_PATH,
            EnrollError,
            build_renew_request,
            parse_response,
        )

        body = build_renew_request(self.identity, blob, now=self.clock())
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
                headers={"User-Agent": "rma-agent-renewal"})
        try:
            async with self._session.post(base.rstrip("/") + ENROLL_PATH, json=body,
                                          allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_ANSWER)
                status, retry = resp.status, resp.headers.get("Retry-After")
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise EnrollError(0, f"no answer: {str(exc) or type(exc).__name__}") from None
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw
        answer = parse_response(status, parsed, public_key=self.identity.public_key,
                                retry_after=retry, network_keys=self.network_keys() or None)
        return answer.blob, answer.file_text()

    def _install(self, blob: bytes, text: str, base: str) -> None:
        from agent.admission.certificate import Certificate

        write_atomic(self.cert_path, text.encode("ascii"), mode=0o644)
        cert = Certificate.decode(blob)
        st = self.state
        st.renewals += 1
        st.failures = 0
        st.last_ok_at = self.clock()
        st.last_error = ""
        st.last_source = base
        st.not_after = cert.not_after
        st.state = "waiting"
        st.by_result["ok"] = st.by_result.get("ok", 0) + 1
        log.info("network: admission certificate renewed by %s, valid until %s", base,
                 _utc(cert.not_after))
        self.install()

    def _failed(self, cert: Any, error: str, result: str | None) -> None:
        st = self.state
        st.failures += 1
        st.failures_total += 1
        st.last_error = error[:500]
        if result:
            st.by_result[result] = st.by_result.get(result, 0) + 1
        left = cert.not_after - self.clock()
        when = (f"it expires in {left:.0f} s ({_utc(cert.not_after)})" if left > 0
                else f"it EXPIRED at {_utc(cert.not_after)}: this worker is not admitted")
        self._warn.log(log, logging.WARNING if left > 0 else logging.ERROR, "renewal-failed",
                  "network: admission certificate renewal failed (%d in a row): %s; %s",
                  st.failures, st.last_error, when)

    def status(self) -> str:
        """A few words for STATUS= (empty while all is well)."""
        if self.state.state == "failing":
            return f"cert renewal FAILING ({self.state.failures}x)"
        return ""


def _result(exc: Any) -> str:
    status = getattr(exc, "status", 0)
    return "no_answer" if status == 0 else f"http_{status}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class WorkerRenewal:
    """The renewal task a worker runs (owned by WorkerRole): started when the config
    makes this a closed network with ``worker.admission_cert`` set, restarted when
    either changes on reload, stopped with the worker."""

    def __init__(self, agent: Any, wake: Callable[[], None]) -> None:
        self.agent = agent
        self.wake = wake
        self.renewer: CertRenewer | None = None
        self._task: asyncio.Task[None] | None = None
        self._key: tuple[Any, ...] = ()

    def _settings(self) -> tuple[Any, ...]:
        cfg = self.agent.config
        return (cfg.worker.admission_cert, tuple(cfg.network.admission_keys))

    def start(self) -> None:
        from agent.admission.settings import configured_keys, revocation_sources

        self._key = self._settings()
        path, keys = self._key
        dht = self.agent.dht
        identity = dht.identity if dht is not None else None
        if not path or not keys or identity is None:
            return
        self.renewer = CertRenewer(
            cert_path=Path(path), identity=identity,
            sources=lambda: revocation_sources(self.agent.config),
            network_keys=lambda: tuple(configured_keys(self.agent.config)),
            install=self._installed)
        self._task = asyncio.create_task(self.renewer.run(), name="worker-cert-renewal")

    def _installed(self) -> None:
        """A renewed certificate is on disk: the admission component re-reads it and the
        worker re-announces with it now."""
        admission = self.agent.admission
        if admission is not None and admission.reload_certificate():
            self.wake()
        self.agent.status_changed()

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        self.renewer = None

    async def reload(self) -> None:
        if self._settings() != self._key:
            await self.stop()
            self.start()

    def stats(self) -> dict[str, Any] | None:
        return self.renewer.state.to_json() if self.renewer is not None else None

    def status(self) -> str:
        return self.renewer.status() if self.renewer is not None else ""
