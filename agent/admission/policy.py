"""The admission policy: which worker records a closed network admits.

A network is *closed* when ``network.admission_keys`` lists at least one public key of an
admission authority. Only workers holding a certificate signed by one of those keys (or by
an issuer one of those keys certified, within the issuer's limits), for their own public
key and covering every service they announce, and whose key — and issuer — no trusted
revocation list names, are stored, registered or offered. See docs/SECURITY.md for the
trust model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from agent.admission.certificate import Certificate
from agent.admission.keys import AdmissionError, key_id
from agent.admission.revocation import RevocationList

CERT_SKEW = 300.0             # a cert not valid yet by less than this is accepted (clocks)
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
            else:
                cert = cert.limit_problem() or cert
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
        if cert.issuer is not None and cert.issuer.subject in self.revoked:
            return "issuer revoked"
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
