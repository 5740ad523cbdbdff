"""Issuer certificates: the offline admission key delegates admission to a coordinator.

**Issuer certificate** (``rma-agent admit --issuer``), one line of base64 in the file
``network.issuer_cert`` names::

    [1, key_id(4), issuer_public_key(32), name, [service, ...], not_before, not_after,
     max_cert_s, sig(64)]

signed by an admission key (``key_id`` names it) under ``ISSUER_DOMAIN``. The subject is a
coordinator's own identity key (``rma-agent identity`` on that box): with it the
coordinator signs short-lived worker certificates (``Certificate`` version 2,
``agent.admission.certificate``) for at most ``services``, each living at most
``max_cert_s`` seconds and never past the issuer certificate's own ``not_after``.

Why a separate domain and layout (not a ``Certificate`` with a flag): an issuer
certificate must never be usable as a worker certificate — a coordinator holding one
does not thereby become an admitted *worker* — and vice versa.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.admission.keys import (
    AdmissionError,
    b64_key,
    check_canonical,
    check_grant,
    check_size,
    key_id,
    pack,
    unpack_signed,
    verify_sig,
)
from agent.dht.record import ALL_SERVICES

ISSUER_VERSION = 1
ISSUER_DOMAIN = b"rma-agent/issuer-cert/v1\x00"
MAX_ISSUER_BYTES = 256
MAX_ISSUER_NAME = 32          # short: the issuer certificate rides inside every worker's
MAX_ISSUER_SERVICES = 16      # chained certificate, itself inside the record's cert budget
MAX_ISSUER_DAYS = 3650
MAX_ISSUED_S = 365 * 86400    # the longest worker certificate an issuer may be allowed
DEFAULT_MAX_CERT_DAYS = 7


class Signer(Protocol):
    """What signs: a ``NetworkKey`` (offline admission key) or an ``Identity``."""

    public_key: bytes

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class IssuerCertificate:
    """Admission key ``key_id`` lets ``subject`` issue worker certificates for
    ``services``, each at most ``max_cert_s`` long, between ``not_before`` and
    ``not_after``."""

    version: int
    key_id: bytes
    subject: bytes
    name: str
    services: tuple[str, ...]
    not_before: int
    not_after: int
    max_cert_s: int
    signature: bytes

    def _fields(self) -> list[Any]:
        return [self.version, self.key_id, self.subject, self.name, list(self.services),
                self.not_before, self.not_after, self.max_cert_s]

    def encode(self) -> bytes:
        return pack([*self._fields(), self.signature])

    @classmethod
    def issue(cls, key: Signer, subject: bytes, *, name: str = "",
              services: Iterable[str] = (ALL_SERVICES,), days: float = 365,
              max_cert_days: float = DEFAULT_MAX_CERT_DAYS,
              now: float | None = None) -> IssuerCertificate:
        """Sign an issuer certificate with the admission key; AdmissionError when an
        argument is out of bounds."""
        now = time.time() if now is None else now
        if not (isinstance(days, int | float) and math.isfinite(days)
                and 0 < days <= MAX_ISSUER_DAYS):
            raise AdmissionError(f"days must be in (0, {MAX_ISSUER_DAYS}], got {days!r}")
        if not (isinstance(max_cert_days, int | float) and math.isfinite(max_cert_days)
                and 0 < max_cert_days * 86400 <= MAX_ISSUED_S):
            raise AdmissionError(f"max-cert-days must be in (0, {MAX_ISSUED_S // 86400}], "
                                 f"got {max_cert_days!r}")
        fields = [ISSUER_VERSION, key_id(key.public_key), bytes(subject), name,
                  list(services), int(now), int(now + days * 86400),
                  max(1, int(max_cert_days * 86400))]
        _check_fields(fields)
        cert = cls(ISSUER_VERSION, fields[1], fields[2], name, tuple(services), fields[5],
                   fields[6], fields[7], key.sign(ISSUER_DOMAIN + pack(fields)))
        check_size(cert.encode(), MAX_ISSUER_BYTES, "issuer certificate")
        return cert

    @classmethod
    def decode(cls, data: bytes) -> IssuerCertificate:
        """Parse canonical bytes (structure and sizes; ``signed_by`` checks the rest)."""
        data, fields, sig = unpack_signed(data, "issuer certificate", 9,
                                          max_bytes=MAX_ISSUER_BYTES,
                                          max_array=MAX_ISSUER_SERVICES + 1)
        _check_fields(fields)
        cert = cls(*fields[:4], tuple(fields[4]), *fields[5:], sig)
        check_canonical(cert.encode(), data, "issuer certificate")
        return cert

    def signed_by(self, public_key: bytes) -> bool:
        """Whether admission key ``public_key`` made this issuer certificate."""
        return (key_id(public_key) == self.key_id
                and verify_sig(public_key, self.signature, ISSUER_DOMAIN + pack(self._fields())))

    def covers(self, services: Iterable[str]) -> bool:
        """Whether a worker certificate for ``services`` is within this issuer's reach
        (``"*"`` in a worker certificate needs ``"*"`` here)."""
        if ALL_SERVICES in self.services:
            return True
        mine = set(self.services)
        return all(s in mine for s in services)

    def limit_problem(self, services: Iterable[str], not_before: int, not_after: int) -> str | None:
        """None when a worker certificate with these fields is within this issuer's
        limits, else a fixed reason (counted by reason: never quotes peer data)."""
        if not self.covers(services):
            return "certificate names services its issuer may not grant"
        if not_after - not_before > self.max_cert_s:
            return "certificate lives longer than its issuer may grant"
        if not_before < self.not_before or not_after > self.not_after:
            return "certificate is outside its issuer's validity"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id.hex(), "public_key": b64_key(self.subject),
                "name": self.name, "services": list(self.services),
                "not_before": self.not_before, "not_after": self.not_after,
                "max_cert_s": self.max_cert_s}


def _check_fields(f: list[Any]) -> None:
    version, kid, subject, name, services, nb, na, max_s = f
    if type(version) is not int or version != ISSUER_VERSION:
        raise AdmissionError(f"unsupported issuer certificate version {version!r}")
    if type(kid) is not bytes or len(kid) != 4:
        raise AdmissionError("issuer certificate key id must be 4 bytes")
    check_grant("issuer certificate", subject, name, services, nb, na,
                max_name=MAX_ISSUER_NAME, max_services=MAX_ISSUER_SERVICES)
    if type(max_s) is not int or not (0 < max_s <= MAX_ISSUED_S):
        raise AdmissionError(f"issuer certificate max_cert_s must be in 1..{MAX_ISSUED_S}")
