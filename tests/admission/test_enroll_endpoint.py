"""POST /api/network/enroll on a real coordinator process over loopback HTTP: tokens
(used up, expired, revoked, another network's, replayed, guessed), uses counted exactly
under concurrent enrollments and across a restart, renewals (accepted, revoked refused)."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.admission.certificate import Certificate
from agent.admission.enrollment import (
    ENROLL_PATH,
    TOKEN_REJECTED,
    build_enroll_request,
    build_renew_request,
    parse_response,
)
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.admission.tokens import TokenStore
from agent.dht.identity import Identity
from tests.cluster import Cluster, Node
from tests.util import wait_for

pytestmark = pytest.mark.slow

NK = NetworkKey.generate()
NK_B64 = base64.b64encode(NK.public_key).decode()


def post(node: Node, body: Any, *, source: str = "127.0.0.1", raw: bytes | None = None
         ) -> tuple[int, Any, dict[str, str]]:
    """POST to the coordinator's gateway from a chosen loopback address."""
    conn = http.client.HTTPConnection(node.ip, node.gateway_port, timeout=10,
                                      source_address=(source, 0))
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", ENROLL_PATH, body=data,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload), dict(resp.getheaders())
    finally:
        conn.close()


def metric(node: Node, name: str) -> float:
    status, text = node.get("/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enroll")
    with Cluster(tmp) as cl:
        node = cl.coordinator("c1")
        ident = Identity.load_or_create(node.state_dir)
        iss = IssuerCertificate.issue(NK, ident.public_key, name="c1",
                                      services=("llm-inference", "ocr"), max_cert_days=2)
        path = tmp / "c1.issuer"
        path.write_text(base64.b64encode(iss.encode()).decode() + "\n")
        node.data["network"] = {"admission_keys": [NK_B64], "issuer_cert": str(path)}
        cl.start(node)
        cl.wait_ready(node)
        yield cl, node, TokenStore(node.state_dir)


def enroll(node: Node, token: str, *, ident: Identity | None = None, services=(),
           now: float | None = None, source: str = "127.0.0.1"):
    ident = ident or Identity.generate()
    body = build_enroll_request(ident, token, "box", services, now=now)
    return (*post(node, body, source=source), ident, body)


def test_enroll_gives_a_chained_certificate_and_a_replay_uses_nothing(coord):
    _cl, node, store = coord
    secret, _ = store.create(name="one", services="ocr", uses=1)
    status, body, _, ident, req = enroll(node, secret)
    assert status == 200, body
    resp = parse_response(status, body, public_key=ident.public_key)
    cert = resp.certificate
    assert cert.version == 2 and cert.services == ("ocr",) and cert.name == "box"
    assert cert.not_after - cert.not_before == 2 * 86400       # the issuer's max-cert-days
    assert AdmissionPolicy([NK.public_key]).check_cert(resp.blob, ident.public_key, ["ocr"]) is None
    assert body["network_keys"] == [NK_B64]
    # the same request again (a client retrying): answered, no second use counted
    status2, body2, _ = post(node, req)
    assert status2 == 200 and Certificate.decode(base64.b64decode(body2["certificate"])).subject \
        == ident.public_key
    assert {t.name: t.used for t in store.list()}["one"] == 1
    # a new request (Ed25519 is deterministic: another time makes another signature)
    status3, body3, *_ = enroll(node, secret, ident=ident, now=time.time() + 2)
    assert (status3, body3) == (403, {"error": TOKEN_REJECTED})
    wait_for(lambda: "with token one" in node.log_text(), 5, what="the journal line")
    line = next(ln for ln in node.log_text().splitlines() if "with token one" in ln)
    assert base64.b64encode(ident.public_key).decode() in line and "127.0.0.1" in line
    assert secret not in node.log_text()


def test_bad_tokens_all_get_the_same_answer(coord, tmp_path):
    _cl, node, store = coord
    expired, _ = store.create(name="old", uses=5, expires_s=60, now=time.time() - 120)
    revoked, _ = store.create(name="gone", uses=5)
    store.revoke("gone")
    foreign, _ = TokenStore(tmp_path).create(name="elsewhere", uses=5)   # another network's
    answers = {what: enroll(node, tok)[:2] for what, tok in
               [("expired", expired), ("revoked", revoked), ("foreign", foreign)]}
    assert all(a == (403, {"error": TOKEN_REJECTED}) for a in answers.values()), answers
    assert {t.name: t.used for t in store.list()}["old"] == 0


def test_requests_that_are_not_about_tokens(coord):
    _cl, node, store = coord
    secret, _ = store.create(name="ocr-only", services="ocr", uses=5)
    status, body, *_ = enroll(node, secret, services=["llm-inference"])
    assert status == 403 and "services" in body["error"]
    status, body, *_ = enroll(node, secret, now=time.time() - 3600)     # a captured old request
    assert status == 400 and "clock" in body["error"]
    req = build_enroll_request(Identity.generate(), secret, "box", now=time.time())
    req["name"] = "someone-else"                                       # altered in flight
    status, body, _ = post(node, req)
    assert status == 400 and "signature" in body["error"]
    assert post(node, None, raw=b"{not json")[0] == 400
    assert post(node, None, raw=b"[" * 3000)[0] == 400
    assert post(node, None, raw=b"x" * 10_000)[0] == 413
    assert {t.name: t.used for t in store.list()}["ocr-only"] == 0
    conn = http.client.HTTPConnection(node.ip, node.gateway_port, timeout=5)
    conn.request("GET", ENROLL_PATH)
    info = json.loads(conn.getresponse().read())
    conn.close()
    assert info["closed"] and info["enroll"] and info["network_keys"] == [NK_B64]
    assert info["max_cert_s"] == 2 * 86400 and info["services"] == ["llm-inference", "ocr"]


def test_guessing_is_rate_limited_per_address_and_not_logged(coord):
    _cl, node, store = coord
    before_log = node.log_text()
    before = metric(node, "rma_agent_enroll_token_guesses_total")
    guesses = [f"rmat_guess{i:04d}" for i in range(14)]
    answers = [enroll(node, g, source="127.0.0.2")[:3] for g in guesses]
    statuses = [a[0] for a in answers]
    assert statuses[:10] == [403] * 10 and set(statuses[10:]) == {429}, statuses
    assert int(answers[-1][2]["Retry-After"]) >= 1
    # another address is not affected, and a real token from the limited one waits too
    assert enroll(node, "rmat_other", source="127.0.0.3")[0] == 403
    good, _ = store.create(name="after-guessing", uses=1)
    assert enroll(node, good, source="127.0.0.2")[0] == 429
    assert metric(node, "rma_agent_enroll_token_guesses_total") - before == 11
    assert metric(node, 'rma_agent_enroll_requests_total{kind="enroll",result="rate_limited"}') == 5
    added = node.log_text()[len(before_log):].splitlines()
    assert not [ln for ln in added if "enroll" in ln or "token" in ln or "127.0.0.2" in ln
                or "rmat_" in ln], added
    assert len(added) < 5, added          # 16 refused requests, no line for each
    # renewals carry no secret: guessers sharing the address (a tunnel) do not hold them
    worker = Identity.generate()
    v1 = Certificate.issue(NK, worker.public_key, services=("ocr",), days=1)
    assert post(node, build_renew_request(worker, v1.encode()), source="127.0.0.2")[0] == 200


def test_uses_are_counted_exactly_under_concurrency_and_across_a_restart(coord):
    cl, node, store = coord
    five, _ = store.create(name="five", uses=5, services="ocr")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: enroll(node, five, source="127.0.0.4")[:2],
                                range(20)))
    ok = [b for s, b in results if s == 200]
    assert len(ok) == 5, [s for s, _ in results]
    assert all(s == 403 and b == {"error": TOKEN_REJECTED} for s, b in results if s != 200)
    assert len({b["certificate"] for b in ok}) == 5
    three, _ = store.create(name="three", uses=3)
    assert [enroll(node, three, source="127.0.0.4")[0] for _ in range(2)] == [200, 200]
    cl.stop(node)
    cl.start(node)
    cl.wait_ready(node)
    used = {t.name: t.used for t in store.list()}
    assert used["five"] == 5 and used["three"] == 2
    assert enroll(node, five, source="127.0.0.4")[0] == 403
    assert [enroll(node, three, source="127.0.0.4")[0] for _ in range(2)] == [200, 403]
    assert {t.name: t.used for t in store.list()}["three"] == 3


def test_renewal_and_a_revoked_workers_renewal(coord):
    _cl, node, store = coord
    secret, _ = store.create(name="renew", uses=2, services="ocr")
    status, body, _, ident, _ = enroll(node, secret)
    assert status == 200
    blob = base64.b64decode(body["certificate"])
    status, body, _ = post(node, build_renew_request(ident, blob))
    assert status == 200, body
    new = parse_response(status, body, public_key=ident.public_key,
                         network_keys=[NK.public_key]).certificate
    assert new.services == ("ocr",) and new.name == "box" and new.subject == ident.public_key
    # an offline (version 1) certificate renews into an issued one
    direct = Identity.generate()
    v1 = Certificate.issue(NK, direct.public_key, name="old", services=("ocr",), days=1)
    status, body, _ = post(node, build_renew_request(direct, v1.encode()))
    assert status == 200 and parse_response(status, body, public_key=direct.public_key
                                            ).certificate.version == 2
    # refused: someone else's certificate, long expired, not of this network
    status, body, _ = post(node, build_renew_request(Identity.generate(), blob))
    assert status == 403 and "another key" in body["error"]
    stale = Certificate.issue(NK, direct.public_key, services=("ocr",), days=1,
                              now=time.time() - 3 * 86400)
    status, body, _ = post(node, build_renew_request(direct, stale.encode()))
    assert status == 403 and "expired" in body["error"]
    alien = Certificate.issue(NetworkKey.generate(), direct.public_key, services=("ocr",))
    status, body, _ = post(node, build_renew_request(direct, alien.encode()))
    assert status == 403 and "does not list" in body["error"]
    # renewing in a loop: a burst of 3 per key, then 429 (a tenth of the lifetime apart)
    assert [post(node, build_renew_request(direct, v1.encode(), now=time.time() + i))[0]
            for i in (1, 2, 3)] == [200, 200, 429]
    # revoked: the coordinator notices its revocations.list; the renewal is refused
    rl = RevocationList.issue(NK, [ident.public_key])
    (Path(node.state_dir) / "revocations.list").write_text(
        base64.b64encode(rl.encode()).decode() + "\n")

    def refused() -> Any:
        s, b, _ = post(node, build_renew_request(ident, blob))
        return b if s == 403 else None
    assert "worker revoked" in wait_for(refused, 15, what="the renewal refused")["error"]
