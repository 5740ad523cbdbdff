"""The enrollment protocol of ``POST /api/network/enroll`` (pure: no I/O, no clock reads
except a default ``now``).

Used by both ends: the coordinator's endpoint (``agent.admission.enroll_endpoint``) parses
and verifies requests and builds answers; ``rma-agent join`` and the worker's renewal
client build requests and parse answers. docs/SECURITY.md "Issuers and enrollment" has
the trust model.

**Enrollment** (a new box holding a token)::

    {"token": "rmat_...", "public_key": B64, "name": "gpu-box-1", "services": ["ocr"],
     "time": 1767225600, "signature": B64}

``signature`` = Ed25519 by the worker's identity key over ``ENROLL_DOMAIN`` + msgpack
``[public_key(32), name, [service, ...], time, SHA-256(token)(32)]``: proof that the
sender holds the key the certificate will name, bound to this token and instant (the
token itself is not signed, its digest is, so a signature never carries the secret).
``services`` may be ``[]``: everything the token allows. ``name`` is at most 32 bytes:
the certificate (with its issuer's) rides inside every record the worker signs.

**Renewal** (a worker holding a certificate of this network; no token)::

    {"certificate": B64 of the current certificate, "public_key": B64, "time": ...,
     "signature": B64}

``signature`` over ``RENEW_DOMAIN`` + msgpack ``[public_key(32), certificate, time]``.
The coordinator answers with a fresh certificate for the same key, name and services.

Both: ``time`` (Unix seconds) must be within ``MAX_SKEW`` (300 s) of the coordinator's
clock, so a captured request is useless after 5 minutes; within that window the
coordinator remembers what it answered, by signature, so the same enrollment sent again
does not use the token a second time (it gets a certificate again — worthless without
the private key). A different request needs a new signature, hence the private key.

**Answer** 200::

    {"certificate": B64 (exactly the line to write to worker.admission_cert's file),
     "not_after": int, "renew_after": int, "network_keys": [B64, ...], "issuer": B64}

``renew_after`` is when a third of the lifetime is left (ACME's habit). Errors are
``{"error": "..."}``: 400 malformed, 403 ``"token not accepted"`` for every token that is
unknown, used up, expired or revoked (one message: nothing for a guesser to learn), 403
with a reason for a refused renewal, 413 too large, 429 with ``Retry-After`` when an
address (or everyone) guessed too often, 503 when the coordinator cannot issue.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from agent.admission.certificate import MAX_CHAIN_BYTES, Certificate, parse_services
from agent.admission.issuer import Signer
from agent.admission.keys import AdmissionError, b64_key, pack, parse_public_key, verify_sig

ENROLL_PATH = "/api/network/enroll"
ENROLL_DOMAIN = b"rma-agent/enroll/v1\x00"
RENEW_DOMAIN = b"rma-agent/renew/v1\x00"
MAX_SKEW = 300                 # seconds a request's time may differ from the coordinator's
MAX_REQUEST_BYTES = 4096       # a request is ~400 bytes of JSON
MAX_RESPONSE_BYTES = 16384
MAX_TOKEN_CHARS = 128
MAX_ENROLL_NAME = 32           # bytes; see the module docstring
TOKEN_REJECTED = "token not accepted"   # the one answer to any token that does not work


class RequestError(ValueError):
    """A request is malformed (HTTP 400); the message says what to fix."""


class EnrollError(Exception):
    """The coordinator refused (or could not be asked): ``status`` (0 = no HTTP answer),
    the server's one-line ``message`` and, for 429/503, ``retry_after`` seconds."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth trying again later (rate-limited, coordinator trouble, no answer);
        a 4xx refusal is final until something changes."""
        return self.status in (0, 429) or self.status >= 500


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: what the coordinator stores and what a request signs."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or not value or len(value) > limit * 4 // 3 + 4:
        raise RequestError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def _time(value: Any) -> int:
    if type(value) is not int or not (0 <= value < 2**40):
        raise RequestError("time must be an integer (Unix seconds)")
    return value


@dataclass(frozen=True)
class EnrollRequest:
    """A new box asks for a certificate with a token."""

    token: str
    public_key: bytes
    name: str
    services: tuple[str, ...]      # () = whatever the token allows
    time: int
    signature: bytes

    def message(self) -> bytes:
        return ENROLL_DOMAIN + pack([self.public_key, self.name, list(self.services),
                                     self.time, token_digest(self.token)])

    def signature_ok(self) -> bool:
        return verify_sig(self.public_key, self.signature, self.message())

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "public_key": b64_key(self.public_key),
                "name": self.name, "services": list(self.services), "time": self.time,
                "signature": _b64(self.signature)}


@dataclass(frozen=True)
class RenewRequest:
    """A worker proves it holds its key and asks for a fresh certificate."""

    certificate: bytes
    public_key: bytes
    time: int
    signature: bytes

    def message(self) -> bytes:
        return RENEW_DOMAIN + pack([self.public_key, self.certificate, self.time])

    def signature_ok(self) -> bool:
        return verify_sig(self.public_key, self.signature, self.message())

    def to_json(self) -> dict[str, Any]:
        return {"certificate": _b64(self.certificate), "public_key": b64_key(self.public_key),
                "time": self.time, "signature": _b64(self.signature)}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or len(name.encode("utf-8", "surrogatepass")) > MAX_ENROLL_NAME \
            or (name and not name.isprintable()):
        raise RequestError(f"name must be printable text of at most {MAX_ENROLL_NAME} bytes")
    return name


def _check_services(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 16 \
            or not all(isinstance(s, str) for s in value):
        raise RequestError("services must be a list of at most 16 service names")
    if not value:
        return ()
    try:
        services = parse_services(",".join(value))
    except AdmissionError as exc:
        raise RequestError(str(exc)) from None
    if list(services) != list(value):
        raise RequestError("services must be sorted, unique and lowercase")
    return services


def parse_request(body: Any) -> EnrollRequest | RenewRequest:
    """A decoded JSON body as a request (shape and sizes; not the signature or the
    time, see ``problem``). RequestError (HTTP 400) when malformed."""
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object")
    try:
        public_key = parse_public_key(body.get("public_key"), "public_key")
    except AdmissionError as exc:
        raise RequestError(str(exc)) from None
    signature = _unb64(body.get("signature"), "signature", 64)
    if len(signature) != 64:
        raise RequestError("signature must be 64 bytes")
    when = _time(body.get("time"))
    if "token" in body:
        extra = set(body) - {"token", "public_key", "name", "services", "time", "signature"}
        token = body["token"]
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS \
                or not token.isascii() or not token.isprintable():
            raise RequestError(f"token must be text of 1-{MAX_TOKEN_CHARS} characters")
        req: EnrollRequest | RenewRequest = EnrollRequest(
            token, public_key, _check_name(body.get("name", "")),
            _check_services(body.get("services", [])), when, signature)
    elif "certificate" in body:
        extra = set(body) - {"certificate", "public_key", "time", "signature"}
        req = RenewRequest(_unb64(body["certificate"], "certificate", MAX_CHAIN_BYTES),
                           public_key, when, signature)
    else:
        raise RequestError('expected "token" (enrollment) or "certificate" (renewal)')
    if extra:
        raise RequestError(f"unknown field {sorted(extra)[0]!r}")
    return req


def problem(req: EnrollRequest | RenewRequest, now: float | None = None,
            skew: float = MAX_SKEW) -> str | None:
    """None when the request's time is within ``skew`` and its signature verifies,
    else the 400 reason (these say nothing about a token)."""
    now = time.time() if now is None else now
    if abs(req.time - now) > skew:
        return (f"request time is {int(req.time - now):+d} s from the coordinator's clock "
                f"(at most {int(skew)} s allowed): check the clock (NTP)")
    if not req.signature_ok():
        return "signature does not verify with public_key"
    return None


def build_enroll_request(identity_key: Signer, token: str, name: str = "",
                         services: tuple[str, ...] | list[str] = (),
                         now: float | None = None) -> dict[str, Any]:
    """The JSON body ``rma-agent join`` posts: ``identity_key`` is the box's
    ``Identity``; ``services`` () asks for whatever the token allows."""
    when = int(time.time() if now is None else now)
    svcs = tuple(sorted({s.strip().lower() for s in services}))
    req = EnrollRequest(token.strip(), identity_key.public_key, name, svcs, when, b"\0" * 64)
    sig = identity_key.sign(req.message())
    return EnrollRequest(req.token, req.public_key, name, svcs, when, sig).to_json()


def build_renew_request(identity_key: Signer, cert_blob: bytes,
                        now: float | None = None) -> dict[str, Any]:
    """The JSON body a worker posts to renew ``cert_blob`` (its current certificate's
    bytes, as read from ``worker.admission_cert``)."""
    when = int(time.time() if now is None else now)
    req = RenewRequest(bytes(cert_blob), identity_key.public_key, when, b"\0" * 64)
    return RenewRequest(req.certificate, req.public_key, when,
                        identity_key.sign(req.message())).to_json()


def renew_at(cert: Certificate) -> int:
    """When a holder should renew: a third of the lifetime left."""
    return cert.not_after - (cert.not_after - cert.not_before) // 3


@dataclass(frozen=True)
class EnrollResponse:
    """A coordinator's certificate answer."""

    certificate: Certificate
    blob: bytes                      # the certificate's bytes
    not_after: int
    renew_after: int
    network_keys: tuple[bytes, ...]
    issuer: bytes                    # the coordinator key that signed it

    def file_text(self) -> str:
        """What to write to ``worker.admission_cert``'s file (one base64 line)."""
        return _b64(self.blob) + "\n"


def build_response(cert: Certificate, network_keys: tuple[bytes, ...] | list[bytes]
                   ) -> dict[str, Any]:
    """The 200 body for ``cert`` (the coordinator side)."""
    issuer = cert.issuer.subject if cert.issuer is not None else b""
    return {"certificate": _b64(cert.encode()), "not_after": cert.not_after,
            "renew_after": renew_at(cert), "network_keys": [b64_key(k) for k in network_keys],
            "issuer": b64_key(issuer) if issuer else ""}


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def parse_response(status: int, body: Any, *, public_key: bytes,
                   retry_after: str | None = None,
                   network_keys: tuple[bytes, ...] | list[bytes] | None = None
                   ) -> EnrollResponse:
    """The certificate in a coordinator's answer (``body``: decoded JSON, or raw bytes),
    checked to be for ``public_key`` and signed by one of the network keys (those in the
    answer, or ``network_keys`` when the caller already trusts a list — a renewing
    worker passes its ``network.admission_keys``). EnrollError otherwise, carrying the
    server's message and ``Retry-After``."""
    if isinstance(body, bytes | bytearray):
        import json
        try:
            body = json.loads(bytes(body[:MAX_RESPONSE_BYTES]))
        except (ValueError, UnicodeDecodeError):
            body = None
    if status != 200:
        msg = body.get("error") if isinstance(body, dict) else None
        wait = None
        try:
            wait = float(retry_after) if retry_after else None
        except ValueError:
            wait = None
        raise EnrollError(status, str(msg)[:300] if msg else f"HTTP {status}", wait)
    if not isinstance(body, dict):
        raise EnrollError(status, "answer is not a JSON object")
    try:
        blob = _unb64(body.get("certificate"), "certificate", MAX_CHAIN_BYTES)
        cert = Certificate.decode(blob)
        keys = tuple(network_keys) if network_keys is not None else tuple(
            parse_public_key(k, "network_keys entry") for k in body.get("network_keys") or [])
    except (RequestError, AdmissionError, TypeError) as exc:
        raise EnrollError(status, f"bad certificate in the answer: {exc}") from None
    if cert.subject != public_key:
        raise EnrollError(status, "the answer's certificate is for another key")
    if not any(cert.signed_by(k) for k in keys) or cert.limit_problem() is not None:
        raise EnrollError(status, "the answer's certificate does not chain to a network key")
    issuer = cert.issuer.subject if cert.issuer is not None else b""
    return EnrollResponse(cert, blob, cert.not_after, renew_at(cert), keys, issuer)
