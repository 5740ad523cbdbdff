"""Admission certificates: an admission key (or an issuer it named) admits one worker key.

**Certificate version 1** (``rma-agent admit``), at most ``MAX_CERT_BYTES`` = 256 bytes::

    [1, key_id(4), subject_public_key(32), name, [service, ...], not_before, not_after, sig(64)]

``key_id`` = first 4 bytes of SHA-256 of the admission public key (tells which key signed
it, for error messages; the signature is what counts). ``services == ["*"]`` covers every
service. Times are integer Unix seconds. ``sig`` = Ed25519 over ``CERT_DOMAIN`` + the
packed first 7 fields. Typical size: 150 bytes for one name and two services.

**Certificate version 2** (issued by a coordinator, ``POST /api/network/enroll``), at
most ``MAX_CHAIN_BYTES`` = 448 bytes: the same fields with the 4-byte key id replaced by
the whole issuer certificate (``agent.admission.issuer``) it chains to::

    [2, issuer_certificate(bin), subject_public_key(32), name, [service, ...],
     not_before, not_after, sig(64)]

``sig`` = Ed25519 by the issuer certificate's subject (the coordinator's identity key)
over ``ISSUED_DOMAIN`` + the packed first 7 fields, so the signature also binds the issuer
certificate. Valid only within the issuer's limits (``limit_problem``). Typical size: 270
bytes. It is self-contained (no agent needs anything but ``network.admission_keys`` to
check it), which is why the record's ``cert`` budget grew from 256 to 448 bytes
(``agent.dht.record.MAX_CERT``); agents older than that drop a record carrying one as
malformed — docs/SECURITY.md "Issuers and enrollment" has the mixed-network story.

A certificate file holds one certificate as one line of base64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.admission.issuer import MAX_ISSUER_BYTES, IssuerCertificate, Signer
from agent.admission.keys import (
    AdmissionError,
    NetworkKey,
    b64_key,
    check_canonical,
    check_grant,
    check_size,
    key_id,
    pack,
    unpack_signed,
    verify_sig,
)
from agent.dht.record import ALL_SERVICES, MAX_SERVICE, valid_service_name

CERT_VERSION = 1
ISSUED_VERSION = 2
CERT_DOMAIN = b"rma-agent/admission-cert/v1\x00"
ISSUED_DOMAIN = b"rma-agent/issued-cert/v1\x00"
MAX_CERT_BYTES = 256          # a version-1 certificate (what agents before issuers accept)
MAX_CHAIN_BYTES = 448         # any certificate, an issued one with its issuer included
MAX_CERT_NAME = 64
MAX_CERT_SERVICES = 16
MAX_CERT_DAYS = 3650
EXPIRY_WARNING_S = 7 * 86400  # check-config and STATUS= warn this long before expiry


def parse_services(text: str) -> tuple[str, ...]:
    """``"ocr,llm-inference"`` -> ("llm-inference", "ocr") lowercased, validated, sorted;
    ``"*"`` (or an empty string) -> ("*",): every service."""
    items = [s.strip().lower() for s in text.split(",")] if text.strip() else []
    items = [s for s in items if s]
    if not items or items == [ALL_SERVICES]:
        return (ALL_SERVICES,)
    if ALL_SERVICES in items:
        raise AdmissionError("'*' (every service) cannot be combined with service names")
    for s in items:
        if not valid_service_name(s):
            raise AdmissionError(f"bad service name {s!r}: 1-{MAX_SERVICE} of a-z 0-9 . _ -, "
                                 "starting with a letter or digit")
    if len(set(items)) != len(items):
        raise AdmissionError("a service is listed twice")
    if len(items) > MAX_CERT_SERVICES:
        raise AdmissionError(f"at most {MAX_CERT_SERVICES} services per certificate")
    return tuple(sorted(items))


@dataclass(frozen=True)
class Certificate:
    """An admission certificate: authority ``key_id`` admits ``subject`` (a worker's
    public key) for ``services`` between ``not_before`` and ``not_after``. Version 2
    carries the ``issuer`` certificate that signed it (``key_id`` is then the issuer
    certificate's admission key id)."""

    version: int
    key_id: bytes
    subject: bytes
    name: str
    services: tuple[str, ...]
    not_before: int
    not_after: int
    signature: bytes
    issuer: IssuerCertificate | None = None

    def _fields(self) -> list[Any]:
        head: Any = self.key_id if self.issuer is None else self.issuer.encode()
        return [self.version, head, self.subject, self.name, list(self.services),
                self.not_before, self.not_after]

    def encode(self) -> bytes:
        return pack([*self._fields(), self.signature])

    @classmethod
    def issue(cls, key: NetworkKey, subject: bytes, *, name: str = "",
              services: Iterable[str] = (ALL_SERVICES,), days: float = 30,
              now: float | None = None) -> Certificate:
        """Sign a version-1 certificate with an admission key; AdmissionError when an
        argument is out of bounds or the result would exceed ``MAX_CERT_BYTES``."""
        now = time.time() if now is None else now
        if not (isinstance(days, int | float) and math.isfinite(days) and 0 < days <= MAX_CERT_DAYS):
            raise AdmissionError(f"days must be in (0, {MAX_CERT_DAYS}], got {days!r}")
        nb = int(now)
        na = int(now + days * 86400)
        fields = [CERT_VERSION, key_id(key.public_key), bytes(subject), name,
                  list(services), nb, na]
        _check_cert_fields(fields)
        cert = cls(CERT_VERSION, fields[1], fields[2], name, tuple(services), nb, na,
                   key.sign(CERT_DOMAIN + pack(fields)))
        check_size(cert.encode(), MAX_CERT_BYTES, "certificate")
        return cert

    @classmethod
    def issue_by(cls, issuer_key: Signer, issuer: IssuerCertificate, subject: bytes, *,
                 name: str = "", services: Iterable[str] = (ALL_SERVICES,),
                 lifetime: float, now: float | None = None) -> Certificate:
        """Sign a version-2 certificate with an issuer's key (a coordinator's identity).
        ``lifetime`` (seconds) is cut to the issuer's ``max_cert_s`` and its
        ``not_after``; AdmissionError when the issuer does not match the key, may not
        grant ``services``, has expired, or the result would exceed ``MAX_CHAIN_BYTES``."""
        now = time.time() if now is None else now
        if issuer.subject != issuer_key.public_key:
            raise AdmissionError("the issuer certificate is for another key")
        if not (math.isfinite(lifetime) and lifetime >= 1):
            raise AdmissionError(f"lifetime must be at least 1 second, got {lifetime!r}")
        nb = max(int(now), issuer.not_before)
        na = min(int(now + lifetime), nb + issuer.max_cert_s, issuer.not_after)
        if na <= nb:
            raise AdmissionError("the issuer certificate has expired")
        fields = [ISSUED_VERSION, issuer.encode(), bytes(subject), name, list(services), nb, na]
        _check_cert_fields(fields)
        why = issuer.limit_problem(services, nb, na)
        if why is not None:
            raise AdmissionError(why)
        cert = cls(ISSUED_VERSION, issuer.key_id, fields[2], name, tuple(services), nb, na,
                   issuer_key.sign(ISSUED_DOMAIN + pack(fields)), issuer)
        check_size(cert.encode(), MAX_CHAIN_BYTES, "certificate")
        return cert

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """Parse canonical bytes (structure and sizes; see ``signed_by`` for the rest)."""
        data, fields, sig = unpack_signed(data, "certificate", 8, max_bytes=MAX_CHAIN_BYTES,
                                          max_array=MAX_CERT_SERVICES + 1,
                                          max_bin=MAX_ISSUER_BYTES)
        issuer = None
        if fields[0] == ISSUED_VERSION and type(fields[1]) is bytes:
            issuer = IssuerCertificate.decode(fields[1])
        elif len(data) > MAX_CERT_BYTES:
            raise AdmissionError(f"certificate is {len(data)} bytes, the limit is "
                                 f"{MAX_CERT_BYTES}")
        _check_cert_fields(fields)
        kid = fields[1] if issuer is None else issuer.key_id
        cert = cls(fields[0], kid, fields[2], fields[3], tuple(fields[4]), fields[5],
                   fields[6], sig, issuer)
        check_canonical(cert.encode(), data, "certificate")
        return cert

    def signed_by(self, public_key: bytes) -> bool:
        """Whether ``public_key`` (an admission key) made this certificate — directly
        (version 1) or through the issuer certificate it carries (version 2)."""
        if self.issuer is None:
            return (key_id(public_key) == self.key_id
                    and verify_sig(public_key, self.signature, CERT_DOMAIN + pack(self._fields())))
        return (self.issuer.signed_by(public_key)
                and verify_sig(self.issuer.subject, self.signature,
                               ISSUED_DOMAIN + pack(self._fields())))

    def limit_problem(self) -> str | None:
        """Version 2: why this certificate is outside its issuer's limits (services,
        lifetime, validity), else None. Version 1: always None."""
        if self.issuer is None:
            return None
        return self.issuer.limit_problem(self.services, self.not_before, self.not_after)

    def covers(self, services: Iterable[str]) -> bool:
        if ALL_SERVICES in self.services:
            return True
        mine = set(self.services)
        return all(s in mine for s in services)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id.hex(), "public_key": b64_key(self.subject),
               "name": self.name, "services": list(self.services),
               "not_before": self.not_before, "not_after": self.not_after}
        if self.issuer is not None:
            out["issuer"] = self.issuer.to_json()
        return out


def _check_cert_fields(f: list[Any]) -> None:
    version, kid, subject, name, services, nb, na = f
    if type(version) is not int or version not in (CERT_VERSION, ISSUED_VERSION):
        raise AdmissionError(f"unsupported certificate version {version!r}")
    if type(kid) is not bytes or (version == CERT_VERSION and len(kid) != 4):
        raise AdmissionError("certificate key id must be 4 bytes")
    check_grant("certificate", subject, name, services, nb, na, max_name=MAX_CERT_NAME,
                max_services=MAX_CERT_SERVICES)
