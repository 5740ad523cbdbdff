"""What an agent's config says about admission, read the same way by the running
component and by ``rma-agent check-config``: the trusted admission keys, the state of
this worker's own certificate, and where revocation lists are fetched from.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import TYPE_CHECKING

from agent.admission.certificate import EXPIRY_WARNING_S, MAX_CHAIN_BYTES, Certificate
from agent.admission.keys import AdmissionError, b64_key, parse_public_key, read_b64_file
from agent.admission.policy import AdmissionPolicy

if TYPE_CHECKING:
    from agent.config import Config

log = logging.getLogger("rma_agent.network")


def configured_keys(cfg: Config) -> list[bytes]:
    """``network.admission_keys`` as raw keys (the config loader has validated them)."""
    net = getattr(cfg, "network", None)
    out = []
    for text in getattr(net, "admission_keys", ()) or ():
        try:
            out.append(parse_public_key(text, "network.admission_keys entry"))
        except AdmissionError as exc:
            log.error("network: %s (ignored)", exc)
    return out


def cert_path(cfg: Config) -> str:
    """``worker.admission_cert`` ("" when unset)."""
    return str(getattr(cfg.worker, "admission_cert", "") or "")


def certificate_state(cfg: Config, public_key: bytes | None, now: float | None = None
                      ) -> tuple[bytes, list[str], list[str]]:
    """(certificate bytes to carry, errors, warnings) for a worker with this config and
    public key (None: not known, e.g. check-config cannot read the identity).

    Errors are what makes a closed network refuse the worker; in an open network they are
    warnings (nobody checks the certificate there)."""
    now = time.time() if now is None else now
    keys = configured_keys(cfg)
    closed = bool(keys)
    errors: list[str] = []
    warnings: list[str] = []
    if cfg.agent.role != "worker":
        return b"", errors, warnings
    path = cert_path(cfg)
    if not path:
        if closed:
            errors.append("not set, but network.admission_keys makes this a closed network: "
                          "its records will be refused (get one with 'rma-agent admit')")
        return b"", errors, warnings
    try:
        blob = read_b64_file(path, "certificate", MAX_CHAIN_BYTES)
        cert = Certificate.decode(blob)
    except AdmissionError as exc:
        (errors if closed else warnings).append(str(exc))
        return b"", errors, warnings
    problems: list[str] = []
    if public_key is not None and cert.subject != public_key:
        problems.append(f"{path}: certificate is for another key "
                        f"({b64_key(cert.subject)}, this box is {b64_key(public_key)})")
    if closed:
        policy = AdmissionPolicy(keys)
        signed = policy.certificate(blob)
        if isinstance(signed, str):
            problems.append(f"{path}: {signed}")
    services = tuple(cfg.worker.services)
    if not cert.covers(services):
        missing = sorted(set(services) - set(cert.services))
        problems.append(f"{path}: certificate does not cover {', '.join(missing)} "
                        f"(it covers {', '.join(cert.services)})")
    if now >= cert.not_after:
        problems.append(f"{path}: certificate expired at {utc(cert.not_after)}")
    elif now + 300 < cert.not_before:
        problems.append(f"{path}: certificate not valid before {utc(cert.not_before)}")
    elif cert.issuer is not None:
        # an enrolled certificate renews itself (agent.admission.renewal) at a third of its
        # lifetime left: short-lived by design, worth a word only once renewal is due
        if cert.not_after - now < (cert.not_after - cert.not_before) / 3:
            warnings.append(f"{path}: certificate expires in {time_left(cert.not_after - now)} "
                            f"({utc(cert.not_after)}): due for renewal (the worker renews it "
                            "from its coordinators; see 'rma-agent status')")
    elif cert.not_after - now < EXPIRY_WARNING_S:
        warnings.append(f"{path}: certificate expires in {time_left(cert.not_after - now)} "
                        f"({utc(cert.not_after)}): renew it with 'rma-agent admit'")
    (errors if closed else warnings).extend(problems)
    ours = public_key is None or cert.subject == public_key
    return (blob if ours else b""), errors, warnings


def issuer_state(cfg: Config, public_key: bytes | None, now: float | None = None
                 ) -> tuple[list[str], list[str]]:
    """(errors, warnings) about a coordinator's ``network.issuer_cert``: unreadable, not
    signed by a key in ``network.admission_keys``, for another key than this box's
    (``public_key``; None: not known), expired (errors); expiring within 30 days
    (warning). Nothing when unset."""
    from agent.admission.issuer import MAX_ISSUER_BYTES, IssuerCertificate

    path = str(getattr(cfg.network, "issuer_cert", "") or "")
    if not path:
        return [], []
    now = time.time() if now is None else now
    try:
        iss = IssuerCertificate.decode(read_b64_file(path, "issuer certificate",
                                                     MAX_ISSUER_BYTES))
    except AdmissionError as exc:
        msg = str(exc)
        return [msg if msg.startswith(path) else f"{path}: {msg}"], []
    errors: list[str] = []
    if not any(iss.signed_by(k) for k in configured_keys(cfg)):
        errors.append(f"{path}: not signed by a key in network.admission_keys")
    if public_key is not None and iss.subject != public_key:
        errors.append(f"{path}: made for {b64_key(iss.subject)}, but this box's key is "
                      f"{b64_key(public_key)} ('rma-agent identity')")
    if now >= iss.not_after:
        errors.append(f"{path}: expired at {utc(iss.not_after)}")
    elif iss.not_after - now < 30 * 86400:
        return errors, [f"{path}: expires in {time_left(iss.not_after - now)} "
                        f"({utc(iss.not_after)}): ask for a new one ('rma-agent admit --issuer')"]
    return errors, []


def revocation_sources(cfg: Config) -> list[str]:
    """Base URLs revocation lists are fetched from: ``discovery.coordinators`` and the
    scheme://host of each URL entry of ``dht.bootstrap``."""
    out: list[str] = []
    for base in cfg.discovery.coordinators:
        b = base.rstrip("/")
        if b not in out:
            out.append(b)
    for entry in cfg.dht.bootstrap:
        if entry.startswith(("http://", "https://")):
            u = urllib.parse.urlsplit(entry)
            b = f"{u.scheme}://{u.netloc}"
            if b not in out:
                out.append(b)
    return out


NO_SOURCES = ("closed network, but neither discovery.coordinators nor a URL entry of "
              "dht.bootstrap names a coordinator to fetch revocation lists from: only a "
              "revocations.list file in state_dir can revoke workers here")


def utc(t: float) -> str:
    """A Unix time as operators read it in messages."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def time_left(s: float) -> str:
    """A remaining duration in days (or hours when under one)."""
    return f"{s / 86400:.1f} days" if s >= 86400 else f"{s / 3600:.1f} hours"
