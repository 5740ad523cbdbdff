"""Admission certificates: an admission key admits one worker key for some services.

**Certificate** (``rma-agent admit``), at most ``MAX_CERT_BYTES`` = 256 bytes because it
rides inside the signed worker record::

    [1, key_id(4), subject_public_key(32), name, [service, ...], not_before, not_after, sig(64)]

``key_id`` = first 4 bytes of SHA-256 of the admission public key (tells which key signed
it, for error messages; the signature is what counts). ``services == ["*"]`` covers every
service. Times are integer Unix seconds. ``sig`` = Ed25519 over ``CERT_DOMAIN`` + the
packed first 7 fields. Typical size: 150 bytes for one name and two services. The cert file
holds the certificate as one line of base64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.admission.keys import (
    AdmissionError,
    NetworkKey,
    b64_key,
    key_id,
    pack,
    unpack,
    verify_sig,
)
from agent.dht.record import ALL_SERVICES, MAX_SERVICE, valid_service_name

CERT_VERSION = 1
CERT_DOMAIN = b"rma-agent/admission-cert/v1\x00"
MAX_CERT_BYTES = 256
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
    public key) for ``services`` between ``not_before`` and ``not_after``."""

    version: int
    key_id: bytes
    subject: bytes
    name: str
    services: tuple[str, ...]
    not_before: int
    not_after: int
    signature: bytes

    def _fields(self) -> list[Any]:
        return [self.version, self.key_id, self.subject, self.name, list(self.services),
                self.not_before, self.not_after]

    def encode(self) -> bytes:
        return pack([*self._fields(), self.signature])

    @classmethod
    def issue(cls, key: NetworkKey, subject: bytes, *, name: str = "",
              services: Iterable[str] = (ALL_SERVICES,), days: float = 30,
              now: float | None = None) -> Certificate:
        """Sign a certificate; AdmissionError when an argument is out of bounds or the
        result would exceed ``MAX_CERT_BYTES``."""
        now = time.time() if now is None else now
        if not (isinstance(days, int | float) and math.isfinite(days) and 0 < days <= MAX_CERT_DAYS):
            raise AdmissionError(f"days must be in (0, {MAX_CERT_DAYS}], got {days!r}")
        nb = int(now)
        na = int(now + days * 86400)
        fields = [CERT_VERSION, key_id(key.public_key), bytes(subject), name,
                  list(services), nb, na]
        _check_cert_fields(fields)
        cert = cls(*fields[:4], tuple(services), nb, na,  # type: ignore[arg-type]
                   key.sign(CERT_DOMAIN + pack(fields)))
        size = len(cert.encode())
        if size > MAX_CERT_BYTES:
            raise AdmissionError(f"certificate would be {size} bytes, the limit is "
                                 f"{MAX_CERT_BYTES}: use a shorter name or fewer services")
        return cert

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """Parse canonical bytes (structure and sizes; see ``verify`` for the rest)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise AdmissionError("certificate must be bytes")
        data = bytes(data)
        if not data:
            raise AdmissionError("no certificate")
        if len(data) > MAX_CERT_BYTES:
            raise AdmissionError(f"certificate is {len(data)} bytes, the limit is "
                                 f"{MAX_CERT_BYTES}")
        obj = unpack(data, "certificate", max_array=MAX_CERT_SERVICES + 1)
        if not isinstance(obj, list) or len(obj) != 8:
            raise AdmissionError("certificate must be a msgpack array of 8 fields")
        fields = obj[:7]
        _check_cert_fields(fields)
        sig = obj[7]
        if type(sig) is not bytes or len(sig) != 64:
            raise AdmissionError("certificate signature must be 64 bytes")
        cert = cls(*fields[:4], tuple(fields[4]), fields[5], fields[6], sig)
        if cert.encode() != data:
            raise AdmissionError("certificate encoding is not canonical")
        return cert

    def signed_by(self, public_key: bytes) -> bool:
        """Whether ``public_key`` (an admission key) made this certificate."""
        return (key_id(public_key) == self.key_id
                and verify_sig(public_key, self.signature, CERT_DOMAIN + pack(self._fields())))

    def covers(self, services: Iterable[str]) -> bool:
        if ALL_SERVICES in self.services:
            return True
        mine = set(self.services)
        return all(s in mine for s in services)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id.hex(), "public_key": b64_key(self.subject),
                "name": self.name, "services": list(self.services),
                "not_before": self.not_before, "not_after": self.not_after}


def _check_cert_fields(f: list[Any]) -> None:
    version, kid, subject, name, services, nb, na = f
    if type(version) is not int or version != CERT_VERSION:
        raise AdmissionError(f"unsupported certificate version {version!r}")
    if type(kid) is not bytes or len(kid) != 4:
        raise AdmissionError("certificate key id must be 4 bytes")
    if type(subject) is not bytes or len(subject) != 32:
        raise AdmissionError("certificate subject must be a 32-byte public key")
    if type(name) is not str or len(name.encode("utf-8", "surrogatepass")) > MAX_CERT_NAME \
            or (name and not name.isprintable()):
        raise AdmissionError(f"certificate name must be printable text of at most "
                             f"{MAX_CERT_NAME} bytes")
    if not isinstance(services, list | tuple) or not services \
            or len(services) > MAX_CERT_SERVICES:
        raise AdmissionError(f"certificate must name 1-{MAX_CERT_SERVICES} services")
    if list(services) != [ALL_SERVICES]:
        for s in services:
            if not valid_service_name(s) or s != s.lower():
                raise AdmissionError(f"certificate names a bad service {s!r}")
        if list(services) != sorted(set(services)):
            raise AdmissionError("certificate services must be sorted and unique")
    for v, what in ((nb, "not_before"), (na, "not_after")):
        if type(v) is not int or not (0 <= v < 2**40):
            raise AdmissionError(f"certificate {what} must be a non-negative integer")
    if not nb < na:
        raise AdmissionError("certificate not_after must be later than not_before")
