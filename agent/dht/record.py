"""Signed worker records (SPEC §6): what a worker announces under each service key.

Encoding (format 2): a msgpack array of the 19 fields below in declaration order
(``signature`` last). msgpack is deterministic for these types (ints minimal, floats always
float64, str/bin/array headers minimal), and ``decode`` re-encodes and compares, so a record
has exactly one valid byte form. The signature covers ``SIGN_DOMAIN`` + the msgpack array of
the first 18 fields, so it cannot be replayed as any other kind of signed message.

Format 2 adds three fields to format 1:
- ``refresh``: the worker's republish interval in seconds. Callers judge staleness from it
  (a record not refreshed for a few of *its own* intervals is stale), not from their own
  configuration, so a worker configured with a longer interval is not hidden half the time.
- ``agent_version``: the worker's ``agent.__version__``, so a fleet's versions are visible.
- ``cert``: an opaque admission certificate (``b""`` = none), checked by
  ``agent.admission`` in closed networks. At most ``MAX_CERT`` = 448 bytes (256 in 0.2.0
  and before: a certificate issued by a coordinator carries its issuer's certificate; agents
  with the old budget drop records carrying one as malformed, counted).

Format 1 records (16 fields, signed under the v1 domain) are still decoded and verified, so
an upgraded caller keeps seeing workers that have not been upgraded yet: they read as
``refresh = LEGACY_REFRESH``, ``agent_version = ""`` and no certificate. Agents older than
format 2 drop format-2 records as malformed (counted, never fatal), so upgrade callers and
coordinators before workers.

Size: ``encode()`` is at most ``MAX_RECORD_BYTES`` (704; 640 in 0.2.0 and before) — on
top of the per-field limits. A typical record without a certificate (two services, a
40-character URL) is about 260 bytes; with a certificate from ``rma-agent admit`` about
420; with one a coordinator issued (it carries its issuer's, ~290 bytes) about 590. Ten
records of the maximum size still fit one datagram with room for the contacts.

Sequence numbers: ``next_seq()`` is wall-clock milliseconds, bumped to stay strictly
increasing within the process. A restarted worker therefore continues above its previous
records (as long as its clock is not set back by more than the restart took), and storing
nodes keep "newest seq wins" without any state on the worker.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.dht.keys import index_key, index_shard
from agent.limits import (
    MAX_ENDPOINT,
    MAX_GPU,
    MAX_NAME,
    MAX_REGION,
    MAX_SERVICE,
    MAX_SERVICES,
    MAX_TTL,
)

if TYPE_CHECKING:
    from agent.dht.identity import Identity

FORMAT_VERSION = 2
LEGACY_VERSION = 1
ALL_SERVICES = "*"
SIGN_DOMAIN = b"rma-agent/worker-record/v2\x00"
SIGN_DOMAIN_V1 = b"rma-agent/worker-record/v1\x00"
MAX_RECORD_BYTES = 704     # 10 x (704 + 3) + contacts < one 8 KiB datagram
LEGACY_REFRESH = 30.0       # what a format-1 record is taken to promise (the platform default)
MAX_AGENT_VERSION = 24
MAX_CERT = 448              # agent.admission.certificate.MAX_CHAIN_BYTES
DEFAULT_MAX_SKEW = 30.0
MAX_SEQ = 2**63 - 1
SERVICE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_N_FIELDS = {FORMAT_VERSION: 18, LEGACY_VERSION: 15}   # signed fields per format


class RecordError(ValueError):
    """A record is malformed, badly signed, expired or otherwise unacceptable."""


def service_key(service: str) -> bytes:
    """The 20-byte DHT key of a service name (``ALL_SERVICES`` included)."""
    return hashlib.sha1(b"rma-svc:" + service.encode("utf-8")).digest()


def valid_service_name(name: object) -> bool:
    """The one service-name rule (config, records, API paths): 1-63 of lowercase a-z, 0-9,
    ".", "_", "-", starting with a letter or digit."""
    return isinstance(name, str) and SERVICE_RE.fullmatch(name) is not None


def normalize_service(name: str) -> str:
    """What a user typed (API path, CLI argument) as a service name: names are
    case-insensitive for people and lowercase on the wire, so ``OCR`` finds ``ocr``."""
    return name.strip().lower()


_seq_lock = threading.Lock()
_last_seq = 0


def next_seq(now: float | None = None) -> int:
    """Wall-clock-milliseconds sequence, strictly increasing in this process."""
    global _last_seq
    ms = int((time.time() if now is None else now) * 1000)
    with _seq_lock:
        _last_seq = max(ms, _last_seq + 1)
        return _last_seq


# Signature checks cost ~60 µs; a lookup sees the same record bytes from several nodes,
# and every republish of an unchanged record at a storing node is byte-identical only
# when seq is unchanged — so cache "signature valid" by the exact encoded bytes.
_SIG_CACHE_MAX = 8192
_sig_cache: OrderedDict[bytes, None] = OrderedDict()


def _sig_ok_cached(encoded: bytes) -> bool:
    if encoded in _sig_cache:
        _sig_cache.move_to_end(encoded)
        return True
    return False


def _remember_sig(encoded: bytes) -> None:
    _sig_cache[encoded] = None
    if len(_sig_cache) > _SIG_CACHE_MAX:
        _sig_cache.popitem(last=False)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's signed self-description. Immutable; build with ``create``."""

    version: int
    worker_id: bytes
    public_key: bytes
    name: str
    services: tuple[str, ...]
    endpoint: str
    gpu: str
    gpu_memory_gb: float
    load: float
    capacity: int
    region: str
    seq: int
    issued_at: float
    expires_at: float
    withdrawn: bool
    refresh: float
    agent_version: str
    cert: bytes
    signature: bytes
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        name: str,
        services: tuple[str, ...] | list[str],
        endpoint: str,
        gpu: str,
        gpu_memory_gb: float,
        load: float,
        capacity: int,
        region: str,
        seq: int | None = None,
        ttl: float,
        withdrawn: bool = False,
        refresh: float = LEGACY_REFRESH,
        agent_version: str | None = None,
        cert: bytes = b"",
        now: float | None = None,
    ) -> WorkerRecord:
        """A signed record. ``seq=None`` takes ``next_seq(now)``. Raises RecordError
        when a field is out of bounds (the same checks a receiver applies).
        ``agent_version=None`` takes this program's ``agent.__version__``."""
        now = time.time() if now is None else float(now)
        if agent_version is None:
            agent_version = __version__
        if not (0 < ttl <= MAX_TTL):
            raise RecordError(f"ttl must be in (0, {MAX_TTL:g}] seconds, got {ttl!r}")
        fields = [
            FORMAT_VERSION,
            identity.node_id,
            identity.public_key,
            name,
            tuple(services),
            endpoint,
            gpu,
            float(gpu_memory_gb),
            float(load),
            int(capacity),
            region,
            next_seq(now) if seq is None else int(seq),
            now,
            now + float(ttl),
            bool(withdrawn),
            float(refresh),
            agent_version,
            bytes(cert),
        ]
        _check_fields(fields)
        sig = identity.sign(SIGN_DOMAIN + _pack(fields))
        rec = cls(*fields, sig)  # type: ignore[arg-type]
        enc = rec.encode()
        if len(enc) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(enc)} bytes, the limit is {MAX_RECORD_BYTES}")
        _remember_sig(enc)
        return rec

    def tombstone(self, identity: Identity, *, ttl: float | None = None,
                  now: float | None = None) -> WorkerRecord:
        """A signed withdrawal of this record: same fields, higher seq, withdrawn=True.
        Default ttl keeps it until the withdrawn record would have expired anyway."""
        now = time.time() if now is None else float(now)
        if ttl is None:
            ttl = max(1.0, min(MAX_TTL, self.expires_at - now + 1.0))
        return WorkerRecord.create(
            identity, name=self.name, services=self.services, endpoint=self.endpoint,
            gpu=self.gpu, gpu_memory_gb=self.gpu_memory_gb, load=self.load,
            capacity=self.capacity, region=self.region, seq=max(next_seq(now), self.seq + 1),
            ttl=ttl, withdrawn=True, refresh=self.refresh, agent_version=self.agent_version,
            cert=self.cert, now=now,
        )

    # ------------------------------------------------------------------ wire form
    def _fields(self) -> list[Any]:
        """The signed fields in wire order (format 1 records have no trailing three)."""
        base = [
            self.version, self.worker_id, self.public_key, self.name, self.services,
            self.endpoint, self.gpu, self.gpu_memory_gb, self.load, self.capacity,
            self.region, self.seq, self.issued_at, self.expires_at, self.withdrawn,
        ]
        if self.version == LEGACY_VERSION:
            return base
        return [*base, self.refresh, self.agent_version, self.cert]

    def _sign_domain(self) -> bytes:
        return SIGN_DOMAIN_V1 if self.version == LEGACY_VERSION else SIGN_DOMAIN

    def encode(self) -> bytes:
        """Canonical bytes (msgpack array, signature last). Cached."""
        enc = self._encoded
        if enc is None:
            enc = _pack([*self._fields(), self.signature])
            object.__setattr__(self, "_encoded", enc)
        return enc

    @classmethod
    def decode(cls, data: bytes) -> WorkerRecord:
        """Parse canonical bytes. Checks structure, types and sizes (not the signature
        or times: see ``verify``). Raises RecordError on anything malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RecordError(f"record must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(data)} bytes, the limit is {MAX_RECORD_BYTES}")
        try:
            obj = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=True,
                max_str_len=MAX_ENDPOINT * 4,
                max_bin_len=MAX_CERT, max_array_len=max(MAX_SERVICES, 19), max_map_len=0,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several unrelated types
            raise RecordError(f"record is not valid msgpack: {type(exc).__name__}") from None
        if not isinstance(obj, list) or not obj:
            raise RecordError("record must be a msgpack array")
        n = _N_FIELDS.get(obj[0]) if type(obj[0]) is int else None
        if n is None:
            raise RecordError(f"unsupported record version {obj[0]!r}")
        if len(obj) != n + 1:
            raise RecordError(f"a format {obj[0]} record is an array of {n + 1} fields")
        fields = obj[:n]
        if isinstance(fields[4], list):
            fields[4] = tuple(fields[4])
        _check_fields(fields)
        sig = obj[n]
        if type(sig) is not bytes or len(sig) != 64:
            raise RecordError("signature must be 64 bytes")
        if n == _N_FIELDS[LEGACY_VERSION]:
            fields = [*fields, LEGACY_REFRESH, "", b""]
        rec = cls(*fields, sig)
        if rec.encode() != data:
            raise RecordError("record encoding is not canonical")
        return rec

    # ------------------------------------------------------------------ checks
    def verify(self, now: float | None = None, max_skew: float = DEFAULT_MAX_SKEW) -> None:
        """Raise RecordError unless the record is well-formed, signed by ``public_key``,
        ``worker_id == SHA-1(public_key)``, not expired at ``now``, not issued more than
        ``max_skew`` in the future and not claiming expiry beyond ``MAX_TTL`` ahead."""
        now = time.time() if now is None else now
        _check_fields(self._fields())
        if type(self.signature) is not bytes or len(self.signature) != 64:
            raise RecordError("signature must be 64 bytes")
        if hashlib.sha1(self.public_key).digest() != self.worker_id:
            raise RecordError("worker_id is not SHA-1 of the public key")
        self.check_times(now, max_skew)
        enc = self.encode()
        if len(enc) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(enc)} bytes, the limit is {MAX_RECORD_BYTES}")
        if _sig_ok_cached(enc):
            return
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                self.signature, self._sign_domain() + _pack(self._fields()))
        except (InvalidSignature, ValueError):
            raise RecordError("bad signature") from None
        _remember_sig(enc)

    def check_times(self, now: float, max_skew: float = DEFAULT_MAX_SKEW) -> None:
        """The time part of ``verify``: not expired, not from the future, expiry bounded."""
        if self.expires_at <= now:
            raise RecordError("record expired")
        if self.issued_at > now + max_skew:
            raise RecordError("record issued in the future")
        if self.expires_at > now + MAX_TTL + max_skew:
            raise RecordError("record expiry too far ahead")

    def is_expired(self, now: float) -> bool:
        return self.expires_at <= now

    def serves(self, key: bytes) -> bool:
        """Whether this record belongs under DHT key ``key``: one of its services, its
        service-index shard, or the legacy "*" key (agents before the sharded index
        announce there; storing nodes keep accepting it for them)."""
        return (key == _ALL_KEY or any(service_key(s) == key for s in self.services)
                or key == index_key(index_shard(self.worker_id)))

    def keys(self) -> list[bytes]:
        """Every DHT key the record is announced under: its services and one shard of
        the service index (``agent.dht.keys``; no longer the hot "*" key)."""
        return [service_key(s) for s in self.services] + [
            index_key(index_shard(self.worker_id))]

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "id": self.worker_id.hex(), "name": self.name, "services": list(self.services),
            "endpoint": self.endpoint, "gpu": self.gpu, "gpu_memory_gb": self.gpu_memory_gb,
            "load": self.load, "capacity": self.capacity, "region": self.region,
            "seq": self.seq, "issued_at": self.issued_at, "expires_at": self.expires_at,
            "age_s": max(0.0, now - self.issued_at), "withdrawn": self.withdrawn,
            "refresh": self.refresh, "agent_version": self.agent_version,
            "certified": bool(self.cert),
        }


_ALL_KEY = service_key(ALL_SERVICES)

# A lookup receives the same record bytes from many storing nodes; decoding (with the
# canonical re-encode check) and verifying them once per process keeps a lookup's CPU
# cost independent of how many nodes answered.
_DECODED_MAX = 8192
_decoded: OrderedDict[bytes, WorkerRecord] = OrderedDict()


def decode_verified(data: bytes, now: float | None = None,
                    max_skew: float = DEFAULT_MAX_SKEW) -> WorkerRecord:
    """``decode`` + ``verify``, memoised by the exact bytes (times re-checked each call)."""
    now = time.time() if now is None else now
    rec = _decoded.get(data) if type(data) is bytes else None
    if rec is not None:
        _decoded.move_to_end(data)
        rec.check_times(now, max_skew)
        return rec
    rec = WorkerRecord.decode(data)
    rec.verify(now, max_skew)
    _decoded[bytes(data)] = rec
    if len(_decoded) > _DECODED_MAX:
        _decoded.popitem(last=False)
    return rec


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _str(v: Any, what: str, limit: int, *, empty_ok: bool = True) -> None:
    if type(v) is not str:
        raise RecordError(f"{what} must be a string")
    if not empty_ok and not v:
        raise RecordError(f"{what} must not be empty")
    if _utf8_len(v) > limit:
        raise RecordError(f"{what} longer than {limit} bytes")
    if not v.isprintable():
        raise RecordError(f"{what} contains control characters")


def _finite(v: Any, what: str) -> None:
    if type(v) is not float or not math.isfinite(v):
        raise RecordError(f"{what} must be a finite float")


def _check_fields(f: list[Any]) -> None:
    if not f or type(f[0]) is not int or _N_FIELDS.get(f[0]) != len(f):
        raise RecordError(f"unsupported record version {f[0] if f else None!r}")
    (version, worker_id, public_key, name, services, endpoint, gpu, gpu_memory_gb, load,
     capacity, region, seq, issued_at, expires_at, withdrawn) = f[:15]
    if type(worker_id) is not bytes or len(worker_id) != 20:
        raise RecordError("worker_id must be 20 bytes")
    if type(public_key) is not bytes or len(public_key) != 32:
        raise RecordError("public_key must be 32 bytes")
    _str(name, "name", MAX_NAME)
    if type(services) is not tuple or not services:
        raise RecordError("services must be a non-empty list")
    if len(services) > MAX_SERVICES:
        raise RecordError(f"more than {MAX_SERVICES} services")
    for s in services:
        if not valid_service_name(s):
            raise RecordError(f"bad service name {s!r} (1-{MAX_SERVICE} of A-Z a-z 0-9 . _ -)")
    if len(set(services)) != len(services):
        raise RecordError("duplicate service names")
    _str(endpoint, "endpoint", MAX_ENDPOINT)
    _str(gpu, "gpu", MAX_GPU)
    _finite(gpu_memory_gb, "gpu_memory_gb")
    _finite(load, "load")
    if gpu_memory_gb < 0 or load < 0:
        raise RecordError("gpu_memory_gb and load must not be negative")
    if type(capacity) is not int or not (0 <= capacity <= 1_000_000):
        raise RecordError("capacity must be an integer in [0, 1000000]")
    _str(region, "region", MAX_REGION)
    if type(seq) is not int or not (0 <= seq <= MAX_SEQ):
        raise RecordError("seq must be a non-negative 63-bit integer")
    _finite(issued_at, "issued_at")
    _finite(expires_at, "expires_at")
    if not (issued_at < expires_at <= issued_at + MAX_TTL):
        raise RecordError(f"lifetime must be in (0, {MAX_TTL:g}] seconds")
    if type(withdrawn) is not bool:
        raise RecordError("withdrawn must be a boolean")
    if version == LEGACY_VERSION:
        return
    refresh, agent_version, cert = f[15:]
    _finite(refresh, "refresh")
    if not (1.0 <= refresh <= MAX_TTL):
        raise RecordError(f"refresh must be in [1, {MAX_TTL:g}] seconds")
    _str(agent_version, "agent_version", MAX_AGENT_VERSION)
    if type(cert) is not bytes or len(cert) > MAX_CERT:
        raise RecordError(f"cert must be at most {MAX_CERT} bytes")
