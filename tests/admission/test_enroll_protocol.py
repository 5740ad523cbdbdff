"""The enrollment protocol module: requests built by a joining box verify at the
coordinator, anything altered or stale does not, and answers are checked by the client."""

import base64

import pytest

from agent.admission.certificate import Certificate
from agent.admission.enrollment import (
    EnrollError,
    EnrollRequest,
    RenewRequest,
    RequestError,
    build_enroll_request,
    build_renew_request,
    build_response,
    parse_request,
    parse_response,
    problem,
    renew_at,
)
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey
from agent.dht.identity import Identity

NK = NetworkKey.generate()
COORD = Identity.generate()
W = Identity.generate()
NOW = 1_800_000_000
TOKEN = "rmat_" + "A" * 43


def test_enroll_request_roundtrip_and_signature():
    body = build_enroll_request(W, TOKEN, "gpu-box-1", ["ocr", "asr"], now=NOW)
    assert set(body) == {"token", "public_key", "name", "services", "time", "signature"}
    req = parse_request(body)
    assert isinstance(req, EnrollRequest)
    assert req.services == ("asr", "ocr") and req.public_key == W.public_key
    assert problem(req, now=NOW + 10) is None
    assert "clock" in problem(req, now=NOW + 301)
    assert "clock" in problem(req, now=NOW - 301)


@pytest.mark.parametrize("field,value", [
    ("token", "rmat_other"), ("name", "evil"), ("services", ["llm"]), ("time", NOW + 1),
    # a fixed id: xdist workers must collect the same names, and the key is drawn anew
    pytest.param("public_key", base64.b64encode(Identity.generate().public_key).decode(),
                 id="public_key-another"),
])
def test_altered_enroll_request_does_not_verify(field, value):
    body = build_enroll_request(W, TOKEN, "gpu-box-1", ["ocr"], now=NOW)
    body[field] = value
    assert problem(parse_request(body), now=NOW) == "signature does not verify with public_key"


def test_renew_request_roundtrip():
    blob = b"\x01" * 150
    body = build_renew_request(W, blob, now=NOW)
    req = parse_request(body)
    assert isinstance(req, RenewRequest) and req.certificate == blob
    assert problem(req, now=NOW) is None
    body["certificate"] = base64.b64encode(b"\x02" * 150).decode()
    assert problem(parse_request(body), now=NOW) is not None


def test_domains_are_separate():
    """An enrollment signature is no renewal signature (and neither is a record's)."""
    enroll = parse_request(build_enroll_request(W, TOKEN, now=NOW))
    forged = RenewRequest(b"x", W.public_key, NOW, enroll.signature)
    assert not forged.signature_ok()


@pytest.mark.parametrize("body,match", [
    ([], "JSON object"), ({}, "public_key"),
    ({"public_key": "x"}, "public_key"),
    ("nope", "JSON object"),
])
def test_malformed_requests(body, match):
    with pytest.raises(RequestError, match=match):
        parse_request(body)


def _good(**over):
    body = build_enroll_request(W, TOKEN, "box", ["ocr"], now=NOW)
    body.update(over)
    return body


@pytest.mark.parametrize("over,match", [
    ({"time": "now"}, "time"), ({"time": 1.5}, "time"), ({"signature": "!!"}, "base64"),
    ({"signature": base64.b64encode(b"x" * 10).decode()}, "64 bytes"),
    ({"token": ""}, "token"), ({"token": "x" * 200}, "token"), ({"token": 5}, "token"),
    ({"name": "n" * 33}, "name"), ({"services": ["OCR"]}, "services"),
    ({"services": "ocr"}, "services"), ({"extra": 1}, "unknown field"),
])
def test_bad_fields(over, match):
    with pytest.raises(RequestError, match=match):
        parse_request(_good(**over))
    with pytest.raises(RequestError, match=r"token.*certificate"):
        parse_request({k: v for k, v in _good().items() if k != "token"})


def test_response_roundtrip_and_client_checks():
    iss = IssuerCertificate.issue(NK, COORD.public_key, services=("ocr",), now=NOW)
    cert = Certificate.issue_by(COORD, iss, W.public_key, name="box", services=("ocr",),
                                lifetime=3 * 3600, now=NOW)
    body = build_response(cert, [NK.public_key])
    resp = parse_response(200, body, public_key=W.public_key)
    assert resp.certificate == cert and resp.issuer == COORD.public_key
    assert resp.renew_after == renew_at(cert) == NOW + 2 * 3600
    assert Certificate.decode(base64.b64decode(resp.file_text().strip())) == cert
    with pytest.raises(EnrollError, match="another key"):
        parse_response(200, body, public_key=COORD.public_key)
    with pytest.raises(EnrollError, match="does not chain"):
        parse_response(200, body, public_key=W.public_key,
                       network_keys=[NetworkKey.generate().public_key])
    raw = b'{"error": "token not accepted"}'
    with pytest.raises(EnrollError) as ei:
        parse_response(403, raw, public_key=W.public_key)
    assert ei.value.message == "token not accepted" and not ei.value.retryable
    with pytest.raises(EnrollError) as ei:
        parse_response(429, {"error": "slow down"}, public_key=W.public_key, retry_after="30")
    assert ei.value.retry_after == 30.0 and ei.value.retryable
