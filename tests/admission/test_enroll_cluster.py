"""A worker enrolled at a coordinator is admitted by real agents from its record alone
(the issuer chain rides in the record), and revoking the coordinator's issuer key voids
it everywhere while a worker admitted by the offline key stays."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from agent.admission.certificate import Certificate
from agent.admission.enrollment import build_enroll_request, build_renew_request
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey
from agent.admission.revocation import RevocationList
from agent.admission.tokens import TokenStore
from agent.dht.identity import Identity
from tests.cluster import Cluster, Node, http
from tests.util import wait_for

pytestmark = pytest.mark.slow

NK = NetworkKey.generate()


def names(node: Node) -> set[str] | None:
    status, body = node.get("/api/dht/providers/ocr", timeout=5.0)
    if status != 200 or not isinstance(body, dict):
        return None
    return {w["name"] for w in body.get("workers", body.get("records", []))}


def test_enrolled_worker_is_admitted_and_a_revoked_issuer_voids_it(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("RMA_AGENT_REVOCATION_INTERVAL", "2")
    net = {"network": {"admission_keys": [base64.b64encode(NK.public_key).decode()]}}
    with Cluster(tmp_path, record_ttl=20, republish=2) as cl:
        c1 = cl.coordinator("c1", extra=net)
        coord_key = Identity.load_or_create(c1.state_dir).public_key
        iss = IssuerCertificate.issue(NK, coord_key, services=("ocr",), max_cert_days=1)
        (tmp_path / "c1.issuer").write_text(base64.b64encode(iss.encode()).decode())
        c1.data["network"]["issuer_cert"] = str(tmp_path / "c1.issuer")
        cl.start(c1)
        cl.wait_ready(c1)
        token, _ = TokenStore(c1.state_dir).create(name="e2e", services="ocr", uses=1)

        workers = {}
        for name in ("enrolled", "direct"):
            w = cl.worker(name, seeds=[c1.dht_addr], services=["ocr"],
                          coordinators=[c1.gateway_url], extra=net)
            ident = Identity.load_or_create(w.state_dir)
            if name == "enrolled":
                status, body = http("POST", c1.gateway_url + "/api/network/enroll",
                                    body=build_enroll_request(ident, token, name))
                assert status == 200, body
                line = body["certificate"]
            else:
                line = base64.b64encode(Certificate.issue(
                    NK, ident.public_key, name=name, services=("ocr",)).encode()).decode()
            (tmp_path / f"{name}.cert").write_text(line + "\n")
            w.data["worker"]["admission_cert"] = str(tmp_path / f"{name}.cert")
            workers[name] = w
        cl.start(*workers.values())
        cl.wait_ready(*workers.values())
        _, stats = workers["enrolled"].get("/api/dht/stats")
        assert stats["network"]["certificate"]["issuer"]["public_key"] == \
            base64.b64encode(coord_key).decode()
        wait_for(lambda: all(names(n) == {"enrolled", "direct"} for n in cl.live()), 30,
                 0.5, "every agent offers the enrolled and the directly admitted worker")

        # the offline key revokes the coordinator as an issuer
        rl = RevocationList.issue(NK, [coord_key])
        (c1.state_dir / "revocations.list").write_text(
            base64.b64encode(rl.encode()).decode() + "\n")
        wait_for(lambda: all(names(n) == {"direct"} for n in cl.live()), 30, 0.5,
                 "every agent dropped the worker the revoked issuer admitted")
        ident = Identity.load_or_create(workers["enrolled"].state_dir)
        status, body = http("POST", c1.gateway_url + "/api/network/enroll",
                            body=build_renew_request(ident, base64.b64decode(
                                (tmp_path / "enrolled.cert").read_text().strip())))
        assert status == 403 and "issuer revoked" in body["error"], body
