"""Admission keys and the signing plumbing shared by certificates and revocation lists.

**Network admission key** (``rma-agent network-key create -o FILE``): an Ed25519 private
key as PKCS#8 PEM, mode 0600. Its public half is given to agents as base64 of the raw 32
bytes (``network.admission_keys``). PEM (not raw bytes like ``identity.key``) so the two
kinds of key file cannot be mistaken for each other.

Every signed admission object is canonical msgpack (``pack``/``unpack``: ``decode``
re-encodes and compares, so each object has exactly one valid byte form) and every
signature covers a domain string + the packed fields, so no signature of one kind is ever
valid as another kind (record, proof, cert or list). The files holding certificates and
lists are one line of base64 (``read_b64_file``); new files are never written through an
existing one (``write_new_file``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
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

from agent.dht.record import ALL_SERVICES, valid_service_name
from agent.fsutil import PrivateFileError, read_private_file, write_atomic


class AdmissionError(ValueError):
    """A key, certificate or revocation list is malformed, badly signed or unusable.
    The message is one line meant for the operator."""


def pack(obj: Any) -> bytes:
    """The one msgpack spelling every signed admission object is encoded in."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str, *, max_array: int, max_bin: int = 64) -> Any:
    """Bounded decoding (sizes capped before allocation); AdmissionError naming ``what``."""
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=1024, max_bin_len=max_bin,
                               max_array_len=max_array, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise AdmissionError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def unpack_signed(data: Any, what: str, n_fields: int, *, max_bytes: int, max_array: int,
                  max_bin: int = 64) -> tuple[bytes, list[Any], bytes]:
    """The steps every signed object's ``decode`` starts with, one rule for all kinds:
    ``data`` is 1-``max_bytes`` bytes of one msgpack array of ``n_fields`` whose last is
    a 64-byte signature. Returns (the bytes, the fields before the signature, the
    signature); the caller checks its fields, then :func:`check_canonical`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AdmissionError(f"{what} must be bytes")
    data = bytes(data)
    if not data:
        raise AdmissionError(f"no {what}")
    if len(data) > max_bytes:
        raise AdmissionError(f"{what} is {len(data)} bytes, the limit is {max_bytes}")
    obj = unpack(data, what, max_array=max_array, max_bin=max_bin)
    if not isinstance(obj, list) or len(obj) != n_fields:
        raise AdmissionError(f"{what} must be a msgpack array of {n_fields} fields")
    sig = obj[-1]
    if type(sig) is not bytes or len(sig) != 64:
        raise AdmissionError(f"{what} signature must be 64 bytes")
    return data, obj[:-1], sig


def check_canonical(encoded: bytes, data: bytes, what: str) -> None:
    """``data`` is the one byte form of what it decoded to (re-encoded: ``encoded``)."""
    if encoded != data:
        raise AdmissionError(f"{what} encoding is not canonical")


def check_size(encoded: bytes, limit: int, what: str) -> None:
    """A new object fits where it must travel (a record, a header, a file line)."""
    if len(encoded) > limit:
        raise AdmissionError(f"{what} would be {len(encoded)} bytes, the limit is {limit}: "
                             "use a shorter name or fewer services")


def check_grant(what: str, subject: Any, name: Any, services: Any, not_before: Any,
                not_after: Any, *, max_name: int, max_services: int) -> None:
    """The fields every signed grant shares — a worker's certificate and an issuer's: a
    32-byte subject key, a printable name, sorted unique valid services (or ``*``) and a
    non-empty validity window in integer seconds. One rule, so the two cannot drift;
    AdmissionError names ``what``."""
    if type(subject) is not bytes or len(subject) != 32:
        raise AdmissionError(f"{what} subject must be a 32-byte public key")
    if type(name) is not str or len(name.encode("utf-8", "surrogatepass")) > max_name \
            or (name and not name.isprintable()):
        raise AdmissionError(f"{what} name must be printable text of at most "
                             f"{max_name} bytes")
    if not isinstance(services, list | tuple) or not services \
            or len(services) > max_services:
        raise AdmissionError(f"{what} must name 1-{max_services} services")
    if list(services) != [ALL_SERVICES]:
        for s in services:
            if not valid_service_name(s) or s != s.lower():
                raise AdmissionError(f"{what} names a bad service {s!r}")
        if list(services) != sorted(set(services)):
            raise AdmissionError(f"{what} services must be sorted and unique")
    for v, field in ((not_before, "not_before"), (not_after, "not_after")):
        if type(v) is not int or not (0 <= v < 2**40):
            raise AdmissionError(f"{what} {field} must be a non-negative integer")
    if not not_before < not_after:
        raise AdmissionError(f"{what} not_after must be later than not_before")


def key_id(public_key: bytes) -> bytes:
    """4-byte hint naming an admission key inside a certificate."""
    return hashlib.sha256(public_key).digest()[:4]


def b64_key(public_key: bytes) -> str:
    """A raw public key as operators see and configure it (standard base64)."""
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


def verify_sig(public_key: bytes, sig: bytes, message: bytes) -> bool:
    """Whether ``sig`` is ``public_key``'s Ed25519 signature of ``message`` (never raises)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


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
            data = read_private_file(path, "network key", 16 * 1024)
        except PrivateFileError as exc:
            raise AdmissionError(str(exc)) from None
        if b"-----BEGIN PRIVATE KEY-----" not in data:
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
