"""Revocation lists: the worker keys an admission key no longer admits.

**Revocation list** (``rma-agent revoke``)::

    [1, issuer_public_key(32), seq, issued_at, [revoked_public_key(32), ...] sorted, sig(64)]

One list per admission key; a newer ``seq`` from the same issuer replaces the older list
(revocations are cumulative: ``revoke --list OLD`` carries the old entries over). A list
is only honoured when its issuer is one of the agent's ``admission_keys``. The list file
holds one line of base64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.admission.keys import (
    AdmissionError,
    NetworkKey,
    b64_key,
    check_canonical,
    pack,
    unpack_signed,
    verify_sig,
)

REVOCATION_VERSION = 1
REVOCATION_DOMAIN = b"rma-agent/revocation-list/v1\x00"
MAX_REVOKED = 20_000          # ~660 KB of list: far more than any real network revokes


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
            enc = pack([*self._fields(), self.signature])
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
                   key.sign(REVOCATION_DOMAIN + pack(fields)))

    @classmethod
    def decode(cls, data: bytes) -> RevocationList:
        """Parse and verify (the signature against the embedded issuer; whether the
        issuer is trusted is the caller's question)."""
        data, fields, sig = unpack_signed(data, "revocation list", 6,
                                          max_bytes=64 + 35 * MAX_REVOKED,
                                          max_array=MAX_REVOKED)
        _check_list_fields(fields)
        rl = cls(fields[0], fields[1], fields[2], fields[3], tuple(fields[4]), sig)
        check_canonical(rl.encode(), data, "revocation list")
        if not verify_sig(rl.issuer, sig, REVOCATION_DOMAIN + pack(fields)):
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
