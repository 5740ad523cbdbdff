"""Endpoint ownership, caller side: fetch and check ``GET {endpoint}/.well-known/rma-agent/proof``.

The format is :mod:`agent.proof`'s; this module decides *when* to ask and remembers the
answer. A caller (the router before its first request to an endpoint, the prober for an
answer's top candidates) calls :meth:`OwnershipVerifier.check`:

* a proof verified less than ``reverify_s`` ago (default 180 s) answers at once, without
  a request: routing costs no extra round trip per request;
* otherwise one request (concurrent callers for the same endpoint share it) with a fresh
  nonce, ``allow_redirects=False``, a short timeout and a 4 KiB answer bound.

Outcomes: ``"ok"`` (verified), ``"bad"`` (the endpoint answered but did not prove that the
record's key holder serves it: wrong key, wrong endpoint, bad signature, not JSON, 404 —
e.g. a worker announcing somebody else's URL), ``"down"`` (refused, reset, timed out, or a
5xx such as Cloudflare's 502/530 for a dead origin). ``bad`` is remembered for
``reverify_s`` too, so the endpoint is neither offered nor routed to until a later check
succeeds; ``down`` is the latency tracker's ordinary failure back-off.

The proof is bound to (worker id, endpoint, public key): a new record with another
endpoint or key is a new proof.

The request goes through the endpoint rule (:mod:`agent.discovery.endpoints`) like every
other caller-side request: only through a session whose connector is a
``GuardedConnector``, and never to an endpoint the rule refuses (issue 20: a registered
fake record made callers send proof requests to their own ``127.0.0.1:6666``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from agent.concurrency import SingleFlight
from agent.discovery.endpoints import GuardedConnector, endpoint_refusal
from agent.proof import PROOF_PATH, ProofError, new_nonce, parse_nonce, verify_proof

REVERIFY_S = 180.0          # "every few minutes"
PROOF_TIMEOUT_S = 2.0
MAX_PROOF_BYTES = 4096
MAX_REMEMBERED = 8192

Key = tuple[bytes, str, bytes]     # (worker id, endpoint, public key)


@dataclass(frozen=True)
class ProofOutcome:
    """One check's result: ``kind`` is "ok", "bad" or "down"; ``ms`` the round trip
    (None when answered from memory); ``reason`` says what failed."""

    kind: str
    ms: float | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


_OK_CACHED = ProofOutcome("ok")


def proof_url(endpoint: str, nonce: str) -> str:
    return f"{endpoint.rstrip('/')}{PROOF_PATH}?nonce={nonce}"


class OwnershipVerifier:
    """Remembers which (worker, endpoint, key) proved ownership, and when."""

    def __init__(self, reverify_s: float = REVERIFY_S, timeout_s: float = PROOF_TIMEOUT_S,
                 max_remembered: int = MAX_REMEMBERED, registry: Any = None) -> None:
        self.reverify_s = reverify_s
        self.timeout_s = timeout_s
        self.max_remembered = max_remembered
        # key -> (monotonic time of the check, kind, reason)
        self._state: OrderedDict[Key, tuple[float, str, str]] = OrderedDict()
        self._flight = SingleFlight()
        self.counts: Counter[str] = Counter()
        self._m_checks: Any = None
        self._m_refused: Any = None
        if registry is not None:
            self._m_checks = PromCounter(
                "rma_agent_endpoint_proofs", "Endpoint ownership checks made, by outcome "
                "(ok, bad: answered without a valid proof, down: unreachable)", ["outcome"],
                registry=registry)
            for k in ("ok", "bad", "down"):
                self._m_checks.labels(k)
            self._m_refused = PromCounter(
                "rma_agent_endpoints_refused", "Records left out because callers may not "
                "contact their endpoint (scheme/host rule, discovery.allow_http_hosts and "
                "allow_private_hosts)",
                registry=registry)
            Gauge("rma_agent_endpoint_proof_failed", "Endpoints currently held out after a "
                  "failed ownership proof", registry=registry).set_function(self.failed)

    def count_refused(self, n: int = 1) -> None:
        """Records dropped by :func:`agent.discovery.endpoints.endpoint_refusal`."""
        self.counts["refused"] += n
        if self._m_refused is not None:
            self._m_refused.inc(n)

    def cached(self, worker_id: bytes, endpoint: str, public_key: bytes,
               now: float | None = None) -> ProofOutcome | None:
        """The remembered outcome while it is current ("ok" or "bad"), else None."""
        st = self._state.get((worker_id, endpoint, public_key))
        if st is None:
            return None
        at, kind, reason = st
        mono = time.monotonic() if now is None else now
        if mono - at >= self.reverify_s:
            return None
        return _OK_CACHED if kind == "ok" else ProofOutcome(kind, None, reason)

    def state(self, worker_id: bytes, endpoint: str, public_key: bytes) -> str:
        """"verified", "proof failed" or "unverified" (for explain output and stats)."""
        out = self.cached(worker_id, endpoint, public_key)
        if out is None:
            return "unverified"
        return "verified" if out.ok else "proof failed"

    def failed(self) -> int:
        """How many endpoints are currently held as failed."""
        mono = time.monotonic()
        return sum(1 for at, kind, _ in self._state.values()
                   if kind == "bad" and mono - at < self.reverify_s)

    async def check(self, session: aiohttp.ClientSession, worker_id: bytes, endpoint: str,
                    public_key: bytes, *, force: bool = False) -> ProofOutcome:
        """The endpoint's current ownership outcome (from memory, or one shared request)."""
        if not force:
            hit = self.cached(worker_id, endpoint, public_key)
            if hit is not None:
                return hit
        key = (worker_id, endpoint, public_key)
        flight_key = f"{worker_id.hex()}|{public_key.hex()}|{endpoint}"
        return await self._flight.run(flight_key,
                                      lambda: self._fetch(session, key))

    async def _fetch(self, session: aiohttp.ClientSession, key: Key) -> ProofOutcome:
        _wid, endpoint, public_key = key
        t0 = time.perf_counter()
        out = await self._get_proof(session, endpoint, public_key)
        ms = (time.perf_counter() - t0) * 1000.0
        out = ProofOutcome(out.kind, ms, out.reason)
        self.counts[out.kind] += 1
        if self._m_checks is not None:
            self._m_checks.labels(out.kind).inc()
        if out.kind == "down":
            self._state.pop(key, None)       # liveness is the tracker's business
        else:
            self._state[key] = (time.monotonic(), out.kind, out.reason)
            self._state.move_to_end(key)
            while len(self._state) > self.max_remembered:
                self._state.popitem(last=False)
        return out

    async def _get_proof(self, session: aiohttp.ClientSession, endpoint: str,
                         public_key: bytes) -> ProofOutcome:
        """One proof request, through the endpoint rule: the session must enforce it
        (:class:`GuardedConnector`: names are checked again once resolved), and an
        endpoint the rule refuses is not contacted at all."""
        conn = session.connector
        if not isinstance(conn, GuardedConnector):
            return ProofOutcome("down", None, "not contacted: the session does not "
                                              "enforce the endpoint rule")
        refused = endpoint_refusal(endpoint, conn.allowance())
        if refused is not None:
            self.count_refused()
            return ProofOutcome("down", None, f"not contacted: {refused}")
        nonce = new_nonce()
        try:
            async with session.get(proof_url(endpoint, nonce), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status >= 500:
                    return ProofOutcome("down", None, f"HTTP {resp.status}")
                if resp.status != 200:
                    return ProofOutcome("bad", None, f"proof answered HTTP {resp.status}")
                body = await resp.content.read(MAX_PROOF_BYTES + 1)
                if len(body) > MAX_PROOF_BYTES:
                    return ProofOutcome("bad", None, "proof answer too large")
                try:
                    verify_proof(json.loads(body), public_key=public_key,
                                 nonce=parse_nonce(nonce), endpoint=endpoint)
                except (ProofError, ValueError) as exc:
                    return ProofOutcome("bad", None, str(exc) or "bad proof")
                return ProofOutcome("ok")
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return ProofOutcome("down", None, str(exc) or type(exc).__name__)

    def forget(self, worker_id: bytes) -> None:
        for key in [k for k in self._state if k[0] == worker_id]:
            del self._state[key]

    async def close(self) -> None:
        await self._flight.cancel_all()
