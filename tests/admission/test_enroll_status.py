"""The coordinator says whether it can enroll: STATUS= fragment, the issuer's expiry as a
metric and one journal warning (not one per request) when it is about to expire."""

from __future__ import annotations

import base64
import dataclasses
import logging
import time

from agent.admission.enroll_service import EnrollService
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey
from agent.config.model import NetworkSection
from agent.dht.identity import Identity
from tests.roles.fakes import FakeAgent, FakeDHT, make_config

NK = NetworkKey.generate()


def service(tmp_path, issuer: IssuerCertificate | None, ident: Identity) -> EnrollService:
    net: dict = {"admission_keys": (base64.b64encode(NK.public_key).decode(),)}
    if issuer is not None:
        path = tmp_path / "issuer.cert"
        path.write_text(base64.b64encode(issuer.encode()).decode())
        net["issuer_cert"] = str(path)
    cfg = dataclasses.replace(make_config(tmp_path, "coordinator"),
                              network=NetworkSection(**net))
    agent = FakeAgent(cfg, FakeDHT(ident))
    return EnrollService(agent)  # type: ignore[arg-type]


def test_status_and_expiry_metric(tmp_path, caplog):
    ident = Identity.generate()
    assert service(tmp_path, None, ident).status() == ""
    (tmp_path / "b").mkdir()
    good = service(tmp_path / "b", IssuerCertificate.issue(NK, ident.public_key), ident)
    assert good.status() == "enrolling"
    assert good.agent.registry.get_sample_value(
        "rma_agent_enroll_issuer_expiry_timestamp_seconds") == good.issuer().not_after
    (tmp_path / "c").mkdir()
    soon = IssuerCertificate.issue(NK, ident.public_key, days=3, max_cert_days=1)
    near = service(tmp_path / "c", soon, ident)
    with caplog.at_level(logging.WARNING, logger="rma_agent.enroll"):
        assert near.status().startswith("enrolling, issuer cert EXPIRES in 3.0 days")
        for _ in range(20):
            near.issuer()
    assert len([r for r in caplog.records if "expires" in r.getMessage()]) == 1
    (tmp_path / "d").mkdir()
    other = service(tmp_path / "d", IssuerCertificate.issue(NK, Identity.generate().public_key),
                    ident)
    assert other.status() == "NOT ENROLLING (see network.issuer_cert)"
    assert "not this coordinator's key" in other.problem
    assert other.agent.registry.get_sample_value(
        "rma_agent_enroll_issuer_expiry_timestamp_seconds") == 0.0
    expired = IssuerCertificate.issue(NK, ident.public_key, days=1, max_cert_days=1,
                                      now=time.time() - 2 * 86400)
    (tmp_path / "e").mkdir()
    gone = service(tmp_path / "e", expired, ident)
    assert gone.issuer() is None and "expired" in gone.problem
