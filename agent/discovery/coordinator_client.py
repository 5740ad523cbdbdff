"""The coordinators' registries as a lookup's fallback source: HTTP, bounded, verified here.

When the DHT yields nothing usable, fails or times out, discovery asks every
``discovery.coordinators`` URL ``GET {url}/api/registry/{service}`` at once (at most
``MAX_COORDINATORS``, each bounded in time and size). Each record is decoded and verified
*here* (signature, id, times): a coordinator is a convenience, not a trusted party, so a
record that fails is counted and dropped, never offered.

A watch's periodic refresh (``paced``) reuses the last answer for ``COORDINATOR_REUSE_S``:
a watched service the DHT has no workers of would otherwise send every coordinator an HTTP
request each second. The reused answer is signed records that the caller judges again
(expiry, staleness), so reuse cannot serve a worker past its time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client import Counter as PromCounter

from agent.dht.record import RecordError, decode_verified
from agent.discovery.select import RecordLike
from agent.ratelimit import RateLimiter

log = logging.getLogger("rma_agent.discovery")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=3)   # failures can repeat on every cache miss

COORDINATOR_TIMEOUT_S = 2.0   # per coordinator request (all asked in parallel)
MAX_COORDINATORS = 8          # asked at once; more are ignored (config is operator-set)
MAX_REGISTRY_BYTES = 2 * 1024 * 1024
MAX_REGISTRY_RECORDS = 5000
REGISTRY_LIMIT = 1000         # records asked of a coordinator (its own cap is 1000)
COORDINATOR_REUSE_S = 5.0     # a coordinator fallback's answer is reused this long (paced)
COORDINATOR_REUSE_MAX = 1024


class CoordinatorClient:
    """Asks the configured coordinators for a service's records; counts what happened.

    ``counts`` is the discovery component's own counter (its ``stats()`` reads
    ``coordinator_*`` and ``bad_records`` from it); ``session`` gives the session for the
    operator-configured coordinators (not the guarded one used for workers' endpoints).
    """

    def __init__(self, urls: Callable[[], list[str]],
                 session: Callable[[], aiohttp.ClientSession], clock: Callable[[], float],
                 counts: Counter[str], registry: Any) -> None:
        self._urls = urls
        self._session = session
        self.clock = clock
        self.counts = counts
        self.timeout_s = COORDINATOR_TIMEOUT_S
        # service -> (asked at, records, answered): the last answers (reused when paced)
        self._answers: OrderedDict[str, tuple[float, list[RecordLike], bool]] = OrderedDict()
        kw: dict[str, Any] = {"registry": registry}
        self._m_requests = PromCounter("rma_agent_lookup_coordinator",
                                       "Coordinator registry requests, by outcome",
                                       ["result"], **kw)
        self._m_bad = PromCounter("rma_agent_lookup_bad_records",
                                  "Records from coordinators that failed verification", **kw)

    async def records(self, service: str,
                      paced: bool = False) -> tuple[list[RecordLike], bool]:
        """Records from every configured coordinator, verified; (records, any answered).

        ``paced`` (a watch's refresh): reuse the last answer when it is less than
        ``COORDINATOR_REUSE_S`` old."""
        now = self.clock()
        last = self._answers.get(service) if paced else None
        if last is not None and 0.0 <= now - last[0] < COORDINATOR_REUSE_S:
            self.counts["coordinator_reused"] += 1
            return list(last[1]), last[2]
        records, answered = await self._ask_all(service)
        self._answers[service] = (now, records, answered)
        self._answers.move_to_end(service)
        while len(self._answers) > COORDINATOR_REUSE_MAX:
            self._answers.popitem(last=False)
        return records, answered

    async def _ask_all(self, service: str) -> tuple[list[RecordLike], bool]:
        urls = list(self._urls())[:MAX_COORDINATORS]
        if not urls:
            return [], False
        session = self._session()
        results = await asyncio.gather(*(self._ask(session, u, service) for u in urls))
        records: list[RecordLike] = []
        answered = False
        for recs in results:
            if recs is not None:
                answered = True
                records.extend(recs)
        return records, answered

    async def _ask(self, session: aiohttp.ClientSession, base: str,
                   service: str) -> list[RecordLike] | None:
        """One coordinator's verified records; None when it did not answer usably."""
        url = f"{base.rstrip('/')}/api/registry/{service}?limit={REGISTRY_LIMIT}"
        try:
            data = await self._get_json(session, url)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._failed()
            _LOG_LIMIT.log(log, logging.WARNING, f"coord:{base}",
                           "discovery: coordinator %s did not answer for %r: %s", base,
                           service, str(exc) or type(exc).__name__)
            return None
        raw = data.get("records") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            self._failed()
            return None
        out = self._verified(raw)
        result = "hit" if out else "miss"
        self._m_requests.labels(result).inc()
        self.counts[f"coordinator_{result}"] += 1
        return out

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> Any:
        """GET ``url`` as JSON, at most ``MAX_REGISTRY_BYTES`` read (ValueError past it)."""
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                               allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            if (resp.content_length or 0) > MAX_REGISTRY_BYTES:
                raise ValueError("answer too large")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > MAX_REGISTRY_BYTES:
                    raise ValueError("answer too large")
                chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None

    def _verified(self, raw: list[Any]) -> list[RecordLike]:
        """The records of a registry answer that decode and verify (base64 of each)."""
        now = self.clock()
        out: list[RecordLike] = []
        bad = 0
        for item in raw[:MAX_REGISTRY_RECORDS]:
            try:
                if not isinstance(item, str):
                    raise RecordError("record is not a base64 string")
                rec = decode_verified(base64.b64decode(item, validate=True), now)
            except (RecordError, binascii.Error, ValueError):
                bad += 1
                continue
            out.append(rec)
        if bad:
            self._m_bad.inc(bad)
            self.counts["bad_records"] += bad
        return out

    def _failed(self) -> None:
        self._m_requests.labels("error").inc()
        self.counts["coordinator_errors"] += 1
