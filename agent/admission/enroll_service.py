"""``POST /api/network/enroll`` on a coordinator's gateway: tokens and renewals in,
short-lived certificates out (the protocol: ``agent.admission.enrollment``).

The coordinator signs with its own identity key, which ``network.issuer_cert`` (from
``rma-agent admit --issuer``) certifies; each certificate lives ``DEFAULT_CERT_S`` (7
days) or the issuer's ``max_cert_s`` if shorter, never past the issuer's expiry. The
issuer file is re-read when it changes (no reload needed to put a renewed one in place).

* **Enrollment**: a valid signature, a fresh ``time`` and a token the store accepts
  (``agent.admission.tokens``: one use counted, durably, before signing) give a
  certificate for the token's services (or the subset asked for). An unknown, used-up,
  expired or revoked token gets the same ``403 token not accepted``.
* **Renewal**: a valid signature, a fresh ``time`` and the sender's current certificate
  — issued in this network (the admission policy checks it: chain, limits, revocation of
  the worker and of its issuer), for the sender's key, and not expired more than
  ``RENEW_GRACE`` ago — give a fresh certificate with the same name and services.
* **Renewing in a loop** is bounded per key (``RenewLimiter``: a burst of 3, then one per
  tenth of the certificate's lifetime, at most a minute apart): 429 with ``Retry-After``.
* **Guessing** is bounded per client address (``http.trusted_proxies`` decides whether a
  forwarding header names it) and in total: every unknown token takes one token from the
  address's bucket and from the global one; an empty bucket answers an enrollment 429
  with ``Retry-After`` before its token is looked at (renewals carry no secret and are
  not held back). Guesses are counted in
  ``rma_agent_enroll_token_guesses_total`` and never logged one by one. Each certificate
  handed out is one journal line (address, key, token name or "renewal", expiry).

``GET /api/network/enroll`` says whether this coordinator enrolls (``rma-agent join``
asks it first): ``{"closed": bool, "enroll": bool, "network_keys": [B64], "issuer": B64,
"max_cert_s": int}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from agent.admission.certificate import Certificate
from agent.admission.enrollment import (
    ENROLL_PATH,
    MAX_REQUEST_BYTES,
    TOKEN_REJECTED,
    EnrollRequest,
    RenewRequest,
    RequestError,
    build_response,
    parse_request,
    problem,
)
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import AdmissionError, b64_key, read_b64_file
from agent.admission.settings import configured_keys, time_left, utc
from agent.admission.tokens import Token, TokenError, TokenStore
from agent.dht.record import ALL_SERVICES
from agent.forwarded import client_ip
from agent.http.body import BodyTooLarge, read_bounded
from agent.ratelimit import RateLimiter, TokenBucket

if TYPE_CHECKING:
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.enroll")
_LOG_LIMIT = RateLimiter(rate=1 / 60, burst=3)
_EXPIRY_LOG = RateLimiter(rate=1 / 3600, burst=1)
ISSUER_WARNING_S = 7 * 86400   # the journal and STATUS= warn this long before it expires

DEFAULT_CERT_S = 7 * 86400
RENEW_GRACE = 86400            # a certificate expired less than this ago may still renew
GUESS_BURST = 10               # unknown tokens one address may send at once ...
GUESS_RATE = 1 / 6             # ... then one every 6 s (10 a minute)
GLOBAL_BURST = 300             # and all addresses together
GLOBAL_RATE = 5.0
MAX_ADDRESSES = 10_000         # addresses (and renewing keys) tracked, oldest forgotten
RENEW_BURST = 3                # renewals one key may make at once (retries of lost answers)
RENEW_MIN_INTERVAL = 60.0      # ... then one per this, or a tenth of its lifetime if shorter
MAX_NESTING = 32             # '[' + '{' in a body: a request has two, names may hold some


class GuessLimiter:
    """Token buckets of failed token guesses, per address and in total."""

    def __init__(self, burst: float = GUESS_BURST, rate: float = GUESS_RATE,
                 global_burst: float = GLOBAL_BURST, global_rate: float = GLOBAL_RATE) -> None:
        self.burst, self.rate = burst, rate
        self.total = TokenBucket(global_rate, global_burst)
        self.by_ip: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, ip: str) -> TokenBucket:
        b = self.by_ip.get(ip)
        if b is None:
            b = self.by_ip[ip] = TokenBucket(self.rate, self.burst)
            if len(self.by_ip) > MAX_ADDRESSES:
                self.by_ip.popitem(last=False)
        self.by_ip.move_to_end(ip)
        return b

    def retry_after(self, ip: str) -> int | None:
        """Seconds until ``ip`` may try again (None: now)."""
        for b in (self._bucket(ip), self.total):
            b.take(0.0)                       # refill
            if b.tokens < 1.0:
                return max(1, int((1.0 - b.tokens) / b.rate + 0.999))
        return None

    def failed(self, ip: str) -> None:
        self._bucket(ip).take()
        self.total.take()


class RenewLimiter:
    """Renewals per worker key: an admitted worker renewing in a loop would cost a
    signature and a journal line each time. A worker renews once per two thirds of its
    lifetime, so a tenth of the lifetime (at most a minute) between renewals, after a
    burst of ``RENEW_BURST``, never holds back an honest one."""

    def __init__(self) -> None:
        self.by_key: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def retry_after(self, key: bytes, lifetime: float) -> int | None:
        interval = max(0.1, min(RENEW_MIN_INTERVAL, lifetime / 10))
        b = self.by_key.get(key)
        if b is None:
            b = self.by_key[key] = TokenBucket(1 / interval, RENEW_BURST)
            if len(self.by_key) > MAX_ADDRESSES:
                self.by_key.popitem(last=False)
        self.by_key.move_to_end(key)
        if b.take():
            return None
        return max(1, int((1.0 - b.tokens) / b.rate + 0.999))


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class EnrollService:
    """The enrollment endpoint of one coordinator (mounted by ``CoordinatorRole``)."""

    def __init__(self, agent: AgentAPI) -> None:
        self.agent = agent
        self.store = TokenStore(agent.config.agent.state_dir)
        self.limiter = GuessLimiter()
        self.renewals = RenewLimiter()
        self._lock = asyncio.Lock()
        self._issuer: IssuerCertificate | None = None
        self._issuer_key: tuple[str, float] | None = None   # (path, mtime) loaded
        self.problem = ""
        self._m = Counter("rma_agent_enroll_requests", "POST /api/network/enroll outcomes",
                          ["kind", "result"], registry=agent.registry)
        self._m_guess = Counter("rma_agent_enroll_token_guesses",
                                "Enrollments with a token this coordinator does not know",
                                registry=agent.registry)
        g = Gauge("rma_agent_enroll_issuer_expiry_timestamp_seconds",
                  "When this coordinator's issuer certificate expires (0: none usable)",
                  registry=agent.registry)
        g.set_function(lambda: float(self._issuer.not_after) if self._issuer else 0.0)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(ENROLL_PATH, self.handle)
        app.router.add_get(ENROLL_PATH, self.info)

    # ------------------------------------------------------------------ issuer
    def issuer(self, now: float | None = None) -> IssuerCertificate | None:
        """The usable issuer certificate (re-read when its file changed), else None with
        ``self.problem`` saying why."""
        now = time.time() if now is None else now
        path = self.agent.config.network.issuer_cert
        keys = configured_keys(self.agent.config)
        if not path:
            self._issuer, self.problem = None, "network.issuer_cert is not set"
            return None
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            self._issuer, self._issuer_key = None, None
            self.problem = f"network.issuer_cert: {path}: {exc.strerror or exc}"
            return None
        if self._issuer_key != (path, mtime):
            self._issuer_key = (path, mtime)
            self._issuer = self._load(path, keys)
        iss = self._issuer
        if iss is not None and now >= iss.not_after:
            self.problem = f"network.issuer_cert: {path}: expired at {utc(iss.not_after)}"
            return None
        if iss is not None and iss.not_after - now < ISSUER_WARNING_S:
            _EXPIRY_LOG.log(log, logging.WARNING, "issuer-expiry",
                            "enroll: network.issuer_cert expires %s: workers cannot enroll "
                            "or renew here after that (rma-agent admit --issuer)",
                            utc(iss.not_after))
        return iss

    def status(self) -> str:
        """The STATUS= part: nothing when this coordinator is no issuer."""
        if not self.agent.config.network.issuer_cert:
            return ""
        iss = self.issuer()
        if iss is None:
            return "NOT ENROLLING (see network.issuer_cert)"
        left = iss.not_after - time.time()
        return ("enrolling" if left >= ISSUER_WARNING_S
                else f"enrolling, issuer cert EXPIRES in {time_left(left)}")

    def _load(self, path: str, keys: list[bytes]) -> IssuerCertificate | None:
        dht = self.agent.dht
        ident = dht.identity if dht is not None else None
        try:
            iss = IssuerCertificate.decode(read_b64_file(path, "issuer certificate", 256))
        except AdmissionError as exc:
            self.problem = f"network.issuer_cert: {exc}"
            log.error("enroll: %s", self.problem)
            return None
        if ident is None:               # not started yet: look again at the next request
            self._issuer_key = None
            self.problem = "the coordinator is starting"
            return None
        why = ""
        if not any(iss.signed_by(k) for k in keys):
            why = "not signed by a key in network.admission_keys"
        elif iss.subject != ident.public_key:
            why = (f"made for {b64_key(iss.subject)}, not this coordinator's key "
                   f"{b64_key(ident.public_key)}")
        if why:
            self.problem = f"network.issuer_cert: {path}: {why}"
            log.error("enroll: %s", self.problem)
            return None
        self.problem = ""
        log.info("enroll: issuing certificates for %s (at most %s each) until %s",
                 ",".join(iss.services), _span(iss.max_cert_s), utc(iss.not_after))
        return iss

    async def info(self, request: web.Request) -> web.Response:
        keys = configured_keys(self.agent.config)
        iss = self.issuer() if keys else None
        return web.json_response({
            "closed": bool(keys), "enroll": iss is not None,
            "network_keys": [b64_key(k) for k in keys],
            "issuer": b64_key(iss.subject) if iss is not None else "",
            "services": list(iss.services) if iss is not None else [],
            "max_cert_s": min(DEFAULT_CERT_S, iss.max_cert_s) if iss is not None else 0})

    # ------------------------------------------------------------------ requests
    async def handle(self, request: web.Request) -> web.Response:
        ip = client_ip(request, self.agent.config.http.trusted_proxies)
        kind, resp = await self._handle(request, ip)
        self._m.labels(kind, _result(resp)).inc()
        return resp

    async def _handle(self, request: web.Request, ip: str) -> tuple[str, web.Response]:
        if not configured_keys(self.agent.config):
            return "unknown", _error(409, "this network is open (no network.admission_keys):"
                                          " no certificate is needed to join")
        body = await _read_json(request)
        if isinstance(body, web.Response):
            return "unknown", body
        try:
            req = parse_request(body)
        except RequestError as exc:
            return "unknown", _error(400, str(exc))
        kind = "enroll" if isinstance(req, EnrollRequest) else "renew"
        if kind == "enroll":
            # before anything about the token is looked at; renewals (no secret to
            # guess) are not held back by guessers sharing the address (a tunnel)
            wait = self.limiter.retry_after(ip)
            if wait is not None:
                return kind, _error(429, "too many attempts with unknown tokens; retry "
                                         "later", **{"Retry-After": str(wait)})
        why = problem(req)
        if why is not None:
            return kind, _error(400, why)
        iss = self.issuer()
        if iss is None:
            return kind, _error(503, "this coordinator does not issue certificates now: "
                                     + self.problem, **{"Retry-After": "60"})
        if isinstance(req, EnrollRequest):
            return kind, await self._enroll(req, iss, ip)
        return kind, self._renew(req, iss, ip)

    async def _enroll(self, req: EnrollRequest, iss: IssuerCertificate, ip: str) -> web.Response:
        def resolve(tok: Token) -> tuple[str, ...] | None:
            return _services(req.services, tok.services, iss)

        try:
            async with self._lock:
                out = await asyncio.to_thread(self.store.use, req.token, req.services,
                                              req.signature, resolve=resolve)
        except (TokenError, OSError) as exc:
            _LOG_LIMIT.log(log, logging.ERROR, "store", "enroll: token store: %s", exc)
            return _error(503, "the coordinator cannot read its tokens now",
                          **{"Retry-After": "60"})
        if out.result == "unknown":
            self.limiter.failed(ip)
            self._m_guess.inc()
        if out.result == "services":
            return _error(403, "the token does not allow the services asked for")
        if out.result not in ("ok", "replay") or out.token is None or not out.services:
            return _error(403, TOKEN_REJECTED)
        resp, cert = self._issue(iss, req.public_key, req.name, out.services)
        if cert is not None:
            log.log(logging.INFO if out.result == "ok" else logging.DEBUG,
                    "enroll: %s enrolled %s%s with token %s (%d/%d used) for %s until %s%s",
                    ip, b64_key(req.public_key), f" ({req.name})" if req.name else "",
                    out.token.name, out.token.used, out.token.uses, ",".join(cert.services),
                    utc(cert.not_after), " (repeated request)" if out.result == "replay" else "")
        return resp

    def _renew(self, req: RenewRequest, iss: IssuerCertificate, ip: str) -> web.Response:
        try:
            cert = Certificate.decode(req.certificate)
        except AdmissionError:
            return _error(403, "renewal refused: malformed certificate")
        if cert.subject != req.public_key:
            return _error(403, "renewal refused: the certificate is for another key")
        now = time.time()
        if now >= cert.not_after + RENEW_GRACE:
            return _error(403, f"renewal refused: the certificate expired at "
                               f"{utc(cert.not_after)}; enroll again with a token")
        adm = self.agent.admission
        why = (adm.check_cert(req.certificate, req.public_key, cert.services,
                              now=min(now, cert.not_after - 1))
               if adm is not None else "no admission policy")
        if why is not None:
            return _error(403, f"renewal refused: {why}")
        if not iss.covers(cert.services):
            return _error(403, "renewal refused: this coordinator may not issue certificates "
                               f"for {','.join(cert.services)}")
        wait = self.renewals.retry_after(req.public_key, cert.not_after - cert.not_before)
        if wait is not None:
            return _error(429, "this key renewed just now; retry later",
                          **{"Retry-After": str(wait)})
        resp, new = self._issue(iss, req.public_key, cert.name, cert.services)
        if new is not None:
            log.info("enroll: %s renewed %s%s for %s until %s", ip, b64_key(req.public_key),
                     f" ({cert.name})" if cert.name else "", ",".join(new.services),
                     utc(new.not_after))
        return resp

    def _issue(self, iss: IssuerCertificate, subject: bytes, name: str,
               services: tuple[str, ...]) -> tuple[web.Response, Certificate | None]:
        dht = self.agent.dht
        ident = dht.identity if dht is not None else None
        if ident is None:
            return _error(503, "the coordinator is starting", **{"Retry-After": "5"}), None
        try:
            cert = Certificate.issue_by(ident, iss, subject, name=name[:32], services=services,
                                        lifetime=DEFAULT_CERT_S)
        except AdmissionError as exc:
            return _error(403, f"cannot issue: {exc}"), None
        return web.json_response(build_response(cert, configured_keys(self.agent.config))), cert

    def stats(self) -> dict[str, Any]:
        iss = self._issuer
        return {"enroll": {"issuer": iss.to_json() if iss is not None else None,
                           "problem": self.problem}}


def _services(asked: tuple[str, ...], allowed: tuple[str, ...],
              iss: IssuerCertificate) -> tuple[str, ...] | None:
    """What a certificate for a token holder names: ``asked`` (or everything the token
    allows) within the token's and the issuer's services; None when that is nothing or
    ``asked`` goes beyond them."""
    want = asked or (allowed if ALL_SERVICES not in allowed else iss.services)
    if ALL_SERVICES not in allowed and not set(want) <= set(allowed):
        return None
    if not iss.covers(want):
        if asked:
            return None
        want = tuple(s for s in want if iss.covers((s,)))
    return want or None


def _result(resp: web.Response) -> str:
    return {200: "ok", 400: "bad_request", 403: "refused", 409: "open_network",
            413: "too_large", 429: "rate_limited", 503: "unavailable"}.get(resp.status, "other")


def _span(s: int) -> str:
    return f"{s / 86400:g} days" if s >= 86400 else f"{s / 60:g} minutes"


async def _read_json(request: web.Request) -> Any:
    """The body's JSON (at most ``MAX_REQUEST_BYTES``, nesting bounded), or the 4xx."""
    try:
        raw = await read_bounded(request, MAX_REQUEST_BYTES)
    except BodyTooLarge as exc:
        return _error(413, str(exc))
    except (OSError, ValueError) as exc:
        return _error(400, f"cannot read body: {type(exc).__name__}")
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING:
        return _error(400, "body must be a flat JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "body must be JSON")
