"""Issuer certificates: a coordinator's key, certified by the offline admission key,
admits workers within its limits; agents check the chain from the record alone."""

import dataclasses

import pytest

from agent.admission.certificate import MAX_CHAIN_BYTES, Certificate
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import AdmissionError, NetworkKey
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.dht.identity import Identity
from agent.dht.record import MAX_CERT, WorkerRecord

NK = NetworkKey.generate()
OTHER = NetworkKey.generate()
COORD = Identity.generate()
W = Identity.generate()
NOW = 1_800_000_000


@dataclasses.dataclass
class Rec:
    public_key: bytes
    services: tuple[str, ...]
    cert: bytes
    withdrawn: bool = False


def issuer(key=NK, subject=COORD.public_key, services=("llm-inference", "ocr"), days=365,
           max_cert_days=7, now=NOW):
    return IssuerCertificate.issue(key, subject, name="coord-1", services=services,
                                   days=days, max_cert_days=max_cert_days, now=now)


def issued(iss=None, services=("ocr",), lifetime=7 * 86400, now=NOW, signer=COORD):
    return Certificate.issue_by(signer, iss or issuer(), W.public_key, name="gpu-box-1",
                                services=services, lifetime=lifetime, now=now)


def test_chain_roundtrip_size_and_acceptance():
    c = issued()
    enc = c.encode()
    assert 200 < len(enc) <= MAX_CHAIN_BYTES <= MAX_CERT
    d = Certificate.decode(enc)
    assert d == c and d.version == 2 and d.issuer is not None
    assert d.issuer.subject == COORD.public_key and d.key_id == c.issuer.key_id
    assert d.signed_by(NK.public_key) and not d.signed_by(OTHER.public_key)
    pol = AdmissionPolicy([NK.public_key])
    assert pol.check_cert(enc, W.public_key, ["ocr"], now=NOW + 10) is None
    assert pol.check_cert(enc, W.public_key, ["llm-inference"], now=NOW + 10) == \
        "certificate does not cover the announced services"
    assert pol.check_cert(enc, W.public_key, ["ocr"], now=NOW + 7 * 86400) == \
        "certificate expired"
    assert AdmissionPolicy([OTHER.public_key]).check_cert(enc, W.public_key, ["ocr"],
                                                          now=NOW) is not None
    assert d.to_json()["issuer"]["max_cert_s"] == 7 * 86400


def test_largest_chain_fits_a_real_record():
    iss = IssuerCertificate.issue(NK, COORD.public_key, name="c" * 32, services=("*",),
                                  now=NOW)
    c = Certificate.issue_by(COORD, iss, W.public_key, name="n" * 32, services=("*",),
                             lifetime=86400, now=NOW)
    assert len(c.encode()) <= MAX_CHAIN_BYTES
    # the largest chain inside a typical record (a quick-tunnel URL, two services, a GPU)
    rec = WorkerRecord.create(W, name="gpu-box-1", services=("llm-inference", "ocr"),
                              endpoint="https://some-four-words-here.trycloudflare.com",
                              gpu="NVIDIA GeForce RTX 4090", gpu_memory_gb=24.0, load=0.5,
                              capacity=4, region="eu-west", ttl=300, refresh=30.0,
                              cert=c.encode())
    back = WorkerRecord.decode(rec.encode())
    assert back.cert == c.encode()
    assert AdmissionPolicy([NK.public_key]).check(back, now=NOW + 60) is None


def test_issue_by_is_cut_to_the_issuers_limits():
    iss = issuer(max_cert_days=1, days=2)
    c = issued(iss, lifetime=30 * 86400)
    assert c.not_after - c.not_before == 86400
    late = issued(iss, lifetime=86400, now=NOW + 86400 + 3600)
    assert late.not_after == iss.not_after              # never past the issuer's expiry
    with pytest.raises(AdmissionError, match="may not grant"):
        issued(iss, services=("asr",))
    with pytest.raises(AdmissionError, match="expired"):
        issued(iss, now=NOW + 3 * 86400)
    with pytest.raises(AdmissionError, match="another key"):
        issued(iss, signer=Identity.generate())


def _forge(cert, **changes):
    """A chained certificate with altered fields, re-signed by the issuer's key: what
    a coordinator overstepping its limits would produce."""
    import msgpack

    from agent.admission.certificate import ISSUED_DOMAIN
    from agent.admission.keys import pack
    fields = msgpack.unpackb(cert.encode(), raw=False)[:7]
    for i, v in changes.items():
        fields[int(i[1:])] = v
    return pack([*fields, COORD.sign(ISSUED_DOMAIN + pack(fields))])


@pytest.mark.parametrize("change,reason", [
    ({"f4": ["asr"]}, "certificate names services its issuer may not grant"),
    ({"f4": ["*"]}, "certificate names services its issuer may not grant"),
    ({"f6": NOW + 30 * 86400}, "certificate lives longer than its issuer may grant"),
    ({"f5": NOW - 3600, "f6": NOW + 3600}, "certificate is outside its issuer's validity"),
])
def test_out_of_limits_rejected(change, reason):
    blob = _forge(issued(), **change)
    pol = AdmissionPolicy([NK.public_key])
    assert pol.check_cert(blob, W.public_key, ["asr"] if "f4" in change else ["ocr"],
                          now=NOW + 60) == reason


def test_forged_issuer_and_wrong_signer_rejected():
    pol = AdmissionPolicy([NK.public_key])
    self_made = issuer(key=OTHER)                  # an issuer cert not from the network key
    c = issued(self_made)
    assert pol.check_cert(c.encode(), W.public_key, ["ocr"], now=NOW) == \
        "certificate is from an admission key this network does not list"
    # a worker cert signed by some other key than the issuer certificate names
    import msgpack

    from agent.admission.certificate import ISSUED_DOMAIN
    from agent.admission.keys import pack
    good = issued()
    fields = msgpack.unpackb(good.encode(), raw=False)[:7]
    bad = pack([*fields, W.sign(ISSUED_DOMAIN + pack(fields))])
    assert pol.check_cert(bad, W.public_key, ["ocr"], now=NOW) == \
        "certificate signature does not verify"
    # an issuer certificate is not a worker certificate
    with pytest.raises(AdmissionError):
        Certificate.decode(issuer().encode())


def test_revoked_issuer_voids_every_certificate_it_signed():
    pol = AdmissionPolicy([NK.public_key])
    c = issued().encode()
    other = Certificate.issue(NK, W.public_key, services=("ocr",), now=NOW).encode()
    assert pol.check_cert(c, W.public_key, ["ocr"], now=NOW) is None
    pol.add_list(RevocationList.issue(NK, [COORD.public_key], now=NOW))
    assert pol.check_cert(c, W.public_key, ["ocr"], now=NOW) == "issuer revoked"
    assert pol.check(Rec(W.public_key, ("ocr",), c), now=NOW) == "issuer revoked"
    assert pol.check_cert(other, W.public_key, ["ocr"], now=NOW) is None   # direct cert: fine
    # a withdrawal still goes through (it can only remove the worker's own records)
    assert pol.check(Rec(W.public_key, ("ocr",), c, withdrawn=True), now=NOW) is None


def test_revoked_worker_with_chained_cert():
    pol = AdmissionPolicy([NK.public_key])
    pol.add_list(RevocationList.issue(NK, [W.public_key], now=NOW))
    assert pol.check_cert(issued().encode(), W.public_key, ["ocr"], now=NOW) == "worker revoked"
