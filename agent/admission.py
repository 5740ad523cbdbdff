"""Closed networks: admission keys, admission certificates and revocation lists.

A network is *closed* when ``network.admission_keys`` lists at least one public key of an
admission authority. Only workers holding a certificate signed by one of those keys, for
their own public key and covering every service they announce, are stored, registered or
offered. See docs/SECURITY.md for the trust model.

Formats (all msgpack, canonical: ``decode`` re-encodes and compares, so each object has
exactly one valid byte form; every signature covers a domain string + the packed fields, so
no signature of one kind is ever valid as another kind — record, proof, cert or list):

**Network admission key** (``rma-agent network-key create -o FILE``): an Ed25519 private
key as PKCS#8 PEM, mode 0600. Its public half is given to agents as base64 of the raw 32
bytes (``network.admission_keys``). PEM (not raw bytes like ``identity.key``) so the two
kinds of key file cannot be mistaken for each other.

**Certificate** (``rma-agent admit``), at most ``MAX_CERT_BYTES`` = 256 bytes because it
rides inside the signed worker record::

    [1, key_id(4), subject_public_key(32), name, [service, ...], not_before, not_after, sig(64)]

``key_id`` = first 4 bytes of SHA-256 of the admission public key (tells which key signed
it, for error messages; the signature is what counts). ``services == ["*"]`` covers every
service. Times are integer Unix seconds. ``sig`` = Ed25519 over ``CERT_DOMAIN`` + the
packed first 7 fields. Typical size: 150 bytes for one name and two services. The cert file
holds the certificate as one line of base64.

**Revocation list** (``rma-agent revoke``)::

    [1, issuer_public_key(32), seq, issued_at, [revoked_public_key(32), ...] sorted, sig(64)]

One list per admission key; a newer ``seq`` from the same issuer replaces the older list
(revocations are cumulative: ``revoke --list OLD`` carries the old entries over). A list
is only honoured when its issuer is one of the agent's ``admission_keys``. The list file
holds one line of base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from agent.dht.record import ALL_SERVICES, MAX_SERVICE, valid_service_name
from agent.fsutil import write_atomic

CERT_VERSION = 1
CERT_DOMAIN = b"rma-agent/admission-cert/v1\x00"
REVOCATION_VERSION = 1
REVOCATION_DOMAIN = b"rma-agent/revocation-list/v1\x00"
MAX_CERT_BYTES = 256
MAX_CERT_NAME = 64
MAX_CERT_SERVICES = 16
MAX_CERT_DAYS = 3650
MAX_REVOKED = 20_000          # ~660 KB of list: far more than any real network revokes
CERT_SKEW = 300.0             # a cert not valid yet by less than this is accepted (clocks)
EXPIRY_WARNING_S = 7 * 86400  # check-config and STATUS= warn this long before expiry


class AdmissionError(ValueError):
    """A key, certificate or revocation list is malformed, badly signed or unusable.
    The message is one line meant for the operator."""


# ----------------------------------------------------------------------------- helpers
def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str, *, max_array: int, max_bin: int = 64) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=1024, max_bin_len=max_bin,
                               max_array_len=max_array, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise AdmissionError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def key_id(public_key: bytes) -> bytes:
    """4-byte hint naming an admission key inside a certificate."""
    return hashlib.sha256(public_key).digest()[:4]


def b64_key(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode("ascii")


def parse_public_key(text: str, what: str = "public key") -> bytes:
    """Raw 32-byte Ed25519 public key from base64 (standard or URL-safe alphabet).
    Raises AdmissionError with a one-line reason."""
    if not isinstance(text, str):
        raise AdmissionError(f"{what} must be a base64 string")
    s = text.strip()
    if not s:
        raise AdmissionError(f"{what} is empty")
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise AdmissionError(f"{what} is not valid base64: {s[:60]!r}") from None
    if len(raw) != 32:
        raise AdmissionError(f"{what} must decode to 32 bytes (an Ed25519 public key), "
                             f"got {len(raw)}")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise AdmissionError(f"{what} is not an Ed25519 public key") from None
    return raw


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


def _verify_sig(public_key: bytes, sig: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- key files
class NetworkKey:
    """The admission authority's private key (kept offline by the operator)."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(Encoding.Raw,
                                                                   PublicFormat.Raw)

    @classmethod
    def generate(cls) -> NetworkKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def pem(self) -> bytes:
        return self._private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def save_new(self, path: Path) -> None:
        """Write to ``path`` (which must not exist), mode 0600 from the first byte."""
        write_new_file(path, self.pem(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> NetworkKey:
        """Read a key file; refuse a file other users may read (anyone holding it can
        admit workers to the network)."""
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise AdmissionError(f"{path}: no such file") from None
        except OSError as exc:
            raise AdmissionError(f"{path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AdmissionError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise AdmissionError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} let other "
                                 f"users read the network key; run 'chmod 600 {path}'")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdmissionError(f"{path}: {exc.strerror or exc}") from None
        if len(data) > 16 * 1024 or b"-----BEGIN PRIVATE KEY-----" not in data:
            raise AdmissionError(f"{path}: not a network key (expected a PEM private key "
                                 "made by 'rma-agent network-key create')")
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise AdmissionError(f"{path}: unreadable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AdmissionError(f"{path}: not an Ed25519 key")
        return cls(key)


def write_new_file(path: Path, data: bytes, *, mode: int = 0o644,
                   replace: bool = False) -> None:
    """Create ``path`` with ``data`` and ``mode``; never follows or replaces an existing
    file unless ``replace`` (then written to a temp file and renamed over it)."""
    path = Path(path)
    if replace:
        write_atomic(path, data, mode=mode)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def read_b64_file(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of a one-line base64 file (certificate, revocation list)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise AdmissionError(f"{path}: not a regular file")
        if st.st_size > limit * 2 + 64:
            raise AdmissionError(f"{path}: too large for a {what}")
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise AdmissionError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise AdmissionError(f"{path}: not a base64 {what}") from None
    except OSError as exc:
        raise AdmissionError(f"{path}: {exc.strerror or exc}") from None
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise AdmissionError(f"{path}: not a base64 {what}") from None


# ----------------------------------------------------------------------------- certificates
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
        return _pack([*self._fields(), self.signature])

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
                   key.sign(CERT_DOMAIN + _pack(fields)))
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
        obj = _unpack(data, "certificate", max_array=MAX_CERT_SERVICES + 1)
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
                and _verify_sig(public_key, self.signature, CERT_DOMAIN + _pack(self._fields())))

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


# ----------------------------------------------------------------------------- revocations
@dataclass(frozen=True)
class RevocationList:
    """Public keys an admission authority no longer admits (cumulative, newest seq wins)."""

    version: int
    issuer: bytes
    seq: int
    issued_at: float
    revoked: tuple[bytes, ...]
    signature: bytes
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def _fields(self) -> list[Any]:
        return [self.version, self.issuer, self.seq, self.issued_at, list(self.revoked)]

    def encode(self) -> bytes:
        enc = self._encoded
        if enc is None:
            enc = _pack([*self._fields(), self.signature])
            object.__setattr__(self, "_encoded", enc)
        return enc

    @classmethod
    def issue(cls, key: NetworkKey, revoked: Iterable[bytes], *,
              previous: RevocationList | None = None, remove: Iterable[bytes] = (),
              now: float | None = None) -> RevocationList:
        """A list of ``revoked`` keys plus ``previous``'s (same issuer) minus ``remove``,
        seq above ``previous`` (so it replaces it everywhere)."""
        now = time.time() if now is None else float(now)
        keys = set(revoked)
        seq = int(now * 1000)
        if previous is not None:
            if previous.issuer != key.public_key:
                raise AdmissionError("the existing list was signed by another network key")
            keys |= set(previous.revoked)
            seq = max(seq, previous.seq + 1)
        keys -= set(remove)
        fields = [REVOCATION_VERSION, key.public_key, seq, now, sorted(keys)]
        _check_list_fields(fields)
        return cls(REVOCATION_VERSION, key.public_key, seq, now, tuple(sorted(keys)),
                   key.sign(REVOCATION_DOMAIN + _pack(fields)))

    @classmethod
    def decode(cls, data: bytes) -> RevocationList:
        """Parse and verify (the signature against the embedded issuer; whether the
        issuer is trusted is the caller's question)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise AdmissionError("revocation list must be bytes")
        data = bytes(data)
        if len(data) > 64 + 35 * MAX_REVOKED:
            raise AdmissionError("revocation list too large")
        obj = _unpack(data, "revocation list", max_array=MAX_REVOKED)
        if not isinstance(obj, list) or len(obj) != 6:
            raise AdmissionError("revocation list must be a msgpack array of 6 fields")
        fields = obj[:5]
        _check_list_fields(fields)
        sig = obj[5]
        if type(sig) is not bytes or len(sig) != 64:
            raise AdmissionError("revocation list signature must be 64 bytes")
        rl = cls(fields[0], fields[1], fields[2], fields[3], tuple(fields[4]), sig)
        if rl.encode() != data:
            raise AdmissionError("revocation list encoding is not canonical")
        if not _verify_sig(rl.issuer, sig, REVOCATION_DOMAIN + _pack(fields)):
            raise AdmissionError("revocation list signature does not verify")
        return rl

    def to_json(self) -> dict[str, Any]:
        return {"issuer": b64_key(self.issuer), "seq": self.seq, "issued_at": self.issued_at,
                "revoked": len(self.revoked)}


def _check_list_fields(f: list[Any]) -> None:
    version, issuer, seq, issued_at, revoked = f
    if type(version) is not int or version != REVOCATION_VERSION:
        raise AdmissionError(f"unsupported revocation list version {version!r}")
    if type(issuer) is not bytes or len(issuer) != 32:
        raise AdmissionError("revocation list issuer must be a 32-byte public key")
    if type(seq) is not int or not (0 <= seq < 2**63):
        raise AdmissionError("revocation list seq must be a non-negative integer")
    if type(issued_at) is not float or not math.isfinite(issued_at):
        raise AdmissionError("revocation list issued_at must be a finite float")
    if not isinstance(revoked, list | tuple) or len(revoked) > MAX_REVOKED:
        raise AdmissionError(f"revocation list must hold at most {MAX_REVOKED} keys")
    if any(type(k) is not bytes or len(k) != 32 for k in revoked):
        raise AdmissionError("revocation list entries must be 32-byte public keys")
    if list(revoked) != sorted(set(revoked)):
        raise AdmissionError("revocation list entries must be sorted and unique")


# ----------------------------------------------------------------------------- policy
_CERT_CACHE_MAX = 4096


class AdmissionPolicy:
    """What a closed network admits: records whose certificate is signed by one of
    ``keys``, is for the record's own public key, is in date, covers every announced
    service, and whose key no trusted revocation list names.

    ``check`` is called for every record stored, registered or offered, so decoded and
    signature-checked certificates are memoised by their exact bytes.
    """

    def __init__(self, keys: Iterable[bytes] = (), *, skew: float = CERT_SKEW) -> None:
        self.keys: tuple[bytes, ...] = tuple(dict.fromkeys(keys))
        self.skew = skew
        self.lists: dict[bytes, RevocationList] = {}   # issuer -> newest list
        self.revoked: frozenset[bytes] = frozenset()
        self._certs: OrderedDict[bytes, Certificate | str] = OrderedDict()

    @property
    def closed(self) -> bool:
        return bool(self.keys)

    def set_keys(self, keys: Iterable[bytes]) -> None:
        self.keys = tuple(dict.fromkeys(keys))
        self._certs.clear()
        self.lists = {k: v for k, v in self.lists.items() if k in self.keys}
        self._rebuild()

    def add_list(self, rl: RevocationList) -> bool:
        """Take a (verified) list if its issuer is trusted and it is newer; True when the
        revoked set changed."""
        if rl.issuer not in self.keys:
            return False
        old = self.lists.get(rl.issuer)
        if old is not None and old.seq >= rl.seq:
            return False
        self.lists[rl.issuer] = rl
        before = self.revoked
        self._rebuild()
        return self.revoked != before

    def _rebuild(self) -> None:
        self.revoked = frozenset(k for rl in self.lists.values() for k in rl.revoked)

    def certificate(self, blob: bytes) -> Certificate | str:
        """The certificate in ``blob`` if some admission key signed it, else why not."""
        hit = self._certs.get(blob)
        if hit is not None:
            self._certs.move_to_end(blob)
            return hit
        try:
            cert: Certificate | str = Certificate.decode(blob)
        except AdmissionError:
            # a fixed reason: refusals are counted by reason, and the decoder's messages
            # can quote what a peer sent (an unbounded set of counter keys)
            cert = "malformed certificate"
        else:
            assert isinstance(cert, Certificate)
            signers = [k for k in self.keys if key_id(k) == cert.key_id]
            if not signers:
                cert = "certificate is from an admission key this network does not list"
            elif not any(cert.signed_by(k) for k in signers):
                cert = "certificate signature does not verify"
        self._certs[bytes(blob)] = cert
        if len(self._certs) > _CERT_CACHE_MAX:
            self._certs.popitem(last=False)
        return cert

    def check_cert(self, blob: bytes, public_key: bytes, services: Iterable[str],
                   now: float | None = None) -> str | None:
        """None when ``blob`` admits ``public_key`` for ``services`` now, else the reason."""
        if not self.keys:
            return None
        if not blob:
            return "no admission certificate"
        cert = self.certificate(blob)
        if isinstance(cert, str):
            return cert
        if cert.subject != public_key:
            return "certificate is for another key"
        now = time.time() if now is None else now
        if now + self.skew < cert.not_before:
            return "certificate not valid yet"
        if now >= cert.not_after:
            return "certificate expired"
        if not cert.covers(services):
            return "certificate does not cover the announced services"
        if public_key in self.revoked:
            return "worker revoked"
        return None

    def check(self, record: Any, now: float | None = None) -> str | None:
        """None when ``record`` (a WorkerRecord) is admitted, else the reason.

        A withdrawal (tombstone) only needs a certificate an admission key signed for the
        worker's key — expired, revoked or not, a worker may always take its records
        down, and a tombstone can only ever remove its signer's own records."""
        if not self.keys:
            return None
        blob = getattr(record, "cert", b"")
        if getattr(record, "withdrawn", False):
            if not blob:
                return "no admission certificate"
            cert = self.certificate(blob)
            if isinstance(cert, str):
                return cert
            return None if cert.subject == record.public_key else "certificate is for another key"
        return self.check_cert(blob, record.public_key, record.services, now)

    def admitted(self, records: Iterable[Any], now: float | None = None) -> list[Any]:
        """The records ``check`` admits (all of them in an open network)."""
        if not self.keys:
            return list(records)
        now = time.time() if now is None else now
        return [r for r in records if self.check(r, now) is None]
