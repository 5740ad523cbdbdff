"""Admission certificates, revocation lists and the policy that checks records."""

import dataclasses
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.admission.certificate import MAX_CERT_BYTES, Certificate, parse_services
from agent.admission.keys import AdmissionError, NetworkKey, parse_public_key
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.dht.identity import Identity

NK = NetworkKey.generate()
OTHER_NK = NetworkKey.generate()
W = Identity.generate()
W2 = Identity.generate()


@dataclasses.dataclass
class Rec:
    """The fields of a worker record the policy reads."""

    public_key: bytes
    services: tuple[str, ...]
    cert: bytes
    withdrawn: bool = False


def cert(**kw):
    args = dict(name="gpu-box-1", services=("llm-inference", "ocr"), days=30)
    args.update(kw)
    return Certificate.issue(kw.pop("key", NK), kw.pop("subject", W.public_key),
                             **{k: v for k, v in args.items() if k not in ("key", "subject")})


def test_roundtrip_size_and_fields():
    c = cert()
    enc = c.encode()
    assert len(enc) <= MAX_CERT_BYTES
    assert len(enc) < 160          # one name, two services: well inside the record's budget
    d = Certificate.decode(enc)
    assert d == c
    assert d.signed_by(NK.public_key)
    assert not d.signed_by(OTHER_NK.public_key)
    assert d.subject == W.public_key and d.services == ("llm-inference", "ocr")
    assert d.not_after - d.not_before == 30 * 86400


def test_largest_certificate_fits():
    c = Certificate.issue(NK, W.public_key, name="n" * 64, services=("*",), days=3650)
    assert len(c.encode()) <= MAX_CERT_BYTES
    with pytest.raises(AdmissionError, match="limit is 256"):
        Certificate.issue(NK, W.public_key, name="n" * 64,
                          services=tuple(sorted(f"service-{i:02d}" for i in range(16))))


@pytest.mark.parametrize("days", [0, -1, 3651, float("nan"), float("inf")])
def test_bad_days(days):
    with pytest.raises(AdmissionError, match="days"):
        cert(days=days)


def test_non_canonical_and_tampered_refused():
    c = cert()
    enc = c.encode()
    fields = msgpack.unpackb(enc, raw=False)
    fields[3] = "another-name"             # altered after signing
    tampered = msgpack.packb(fields, use_bin_type=True)
    policy = AdmissionPolicy([NK.public_key])
    assert policy.check_cert(tampered, W.public_key, ["ocr"]) == \
        "certificate signature does not verify"
    with pytest.raises(AdmissionError):
        Certificate.decode(enc[:-1])                  # truncated
    # same values, non-minimal int encoding: refused as non-canonical
    with pytest.raises(AdmissionError, match="canonical"):
        Certificate.decode(_non_canonical(enc))


def _non_canonical(enc: bytes) -> bytes:
    """The same certificate with its version written as a 5-byte uint32."""
    assert enc[0] == 0x98 and enc[1] == 0x01
    return bytes([0x98, 0xCE, 0, 0, 0, 1]) + enc[2:]


def test_policy_reasons():
    policy = AdmissionPolicy([NK.public_key])
    good = cert().encode()
    now = time.time()
    assert policy.check(Rec(W.public_key, ("ocr",), good), now) is None
    assert policy.check(Rec(W.public_key, ("ocr", "llm-inference"), good), now) is None
    assert policy.check(Rec(W.public_key, ("ocr",), b""), now) == "no admission certificate"
    assert policy.check(Rec(W2.public_key, ("ocr",), good), now) == \
        "certificate is for another key"
    assert policy.check(Rec(W.public_key, ("asr",), good), now) == \
        "certificate does not cover the announced services"
    assert policy.check(Rec(W.public_key, ("ocr",), good), now + 31 * 86400) == \
        "certificate expired"
    future = cert(now=now + 3600).encode()
    assert policy.check(Rec(W.public_key, ("ocr",), future), now) == \
        "certificate not valid yet"
    foreign = cert(key=OTHER_NK).encode()
    assert "does not list" in policy.check(Rec(W.public_key, ("ocr",), foreign), now)
    assert policy.check(Rec(W.public_key, ("ocr",), b"\x00junk"), now) == "malformed certificate"
    wildcard = cert(services=("*",)).encode()
    assert policy.check(Rec(W.public_key, ("anything", "else"), wildcard), now) is None


def test_open_network_admits_everything():
    policy = AdmissionPolicy([])
    assert not policy.closed
    recs = [Rec(W.public_key, ("ocr",), b""), Rec(W2.public_key, ("x",), b"junk")]
    assert policy.admitted(recs) == recs


def test_revocation_list_and_policy():
    policy = AdmissionPolicy([NK.public_key, OTHER_NK.public_key])
    rec = Rec(W.public_key, ("ocr",), cert().encode())
    rl = RevocationList.issue(NK, [W.public_key])
    back = RevocationList.decode(rl.encode())
    assert back == rl and back.revoked == (W.public_key,)
    assert policy.add_list(back)
    assert policy.check(rec) == "worker revoked"
    # a revoked worker may still withdraw
    assert policy.check(dataclasses.replace(rec, withdrawn=True)) is None
    # an older list from the same issuer is ignored; a newer one (cumulative) replaces it
    older = RevocationList.issue(NK, [], now=time.time() - 100)
    assert not policy.add_list(older)
    newer = RevocationList.issue(NK, [W2.public_key], previous=rl)
    assert newer.seq > rl.seq and set(newer.revoked) == {W.public_key, W2.public_key}
    policy.add_list(newer)
    assert policy.revoked == {W.public_key, W2.public_key}
    # a list from a key the network does not list is not honoured
    p2 = AdmissionPolicy([OTHER_NK.public_key])
    assert not p2.add_list(rl)
    with pytest.raises(AdmissionError, match="another network key"):
        RevocationList.issue(OTHER_NK, [], previous=rl)


def test_revocation_list_forgery_refused():
    rl = RevocationList.issue(NK, [W.public_key])
    fields = msgpack.unpackb(rl.encode(), raw=False)
    fields[4] = []                                 # drop the entry, keep the signature
    with pytest.raises(AdmissionError, match="does not verify"):
        RevocationList.decode(msgpack.packb(fields, use_bin_type=True))
    fields = msgpack.unpackb(rl.encode(), raw=False)
    fields[1] = OTHER_NK.public_key                # claim another issuer
    with pytest.raises(AdmissionError, match="does not verify"):
        RevocationList.decode(msgpack.packb(fields, use_bin_type=True))


def test_signature_domains_do_not_cross():
    """A certificate's signature is never valid as a revocation list's and vice versa."""
    c = cert()
    rl = RevocationList.issue(NK, [])
    fields = msgpack.unpackb(rl.encode(), raw=False)
    fields[5] = c.signature
    with pytest.raises(AdmissionError):
        RevocationList.decode(msgpack.packb(fields, use_bin_type=True))


def test_parse_helpers():
    assert parse_public_key(" " + __import__("base64").b64encode(W.public_key).decode() + "\n") \
        == W.public_key
    for bad in ["", "!!!", "AAAA", "A" * 44]:
        with pytest.raises(AdmissionError):
            parse_public_key(bad)
    assert parse_services("OCR, llm-inference") == ("llm-inference", "ocr")
    assert parse_services("*") == ("*",) == parse_services("")
    for bad in ["ocr,ocr", "-x", "a b", "*,ocr", ",".join(f"s{i}" for i in range(17))]:
        with pytest.raises(AdmissionError):
            parse_services(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_random_bytes_never_crashes(data):
    policy = AdmissionPolicy([NK.public_key])
    for decode in (Certificate.decode, RevocationList.decode):
        try:
            decode(data)
        except AdmissionError:
            pass
    # refused, and for one of a fixed set of reasons (they are counter keys)
    assert policy.check_cert(data, W.public_key, ["ocr"]) in REASONS


REASONS = {"no admission certificate", "malformed certificate",
           "certificate is from an admission key this network does not list",
           "certificate signature does not verify", "certificate is for another key",
           "certificate not valid yet", "certificate expired",
           "certificate does not cover the announced services", "worker revoked"}


_ENC = cert().encode()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_ENC) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(pos, xor):
    policy = AdmissionPolicy([NK.public_key])
    blob = bytearray(_ENC)
    blob[pos] ^= xor
    assert policy.check_cert(bytes(blob), W.public_key, ["ocr"]) is not None


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
               max_size=20),
       st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True), min_size=1,
                max_size=5, unique=True),
       st.floats(0.01, 3650))
def test_issue_decode_roundtrip(name, services, days):
    name = name if name.isprintable() else ""
    c = Certificate.issue(NK, W.public_key, name=name, services=sorted(services), days=days)
    assert Certificate.decode(c.encode()) == c
    policy = AdmissionPolicy([NK.public_key])
    assert policy.check_cert(c.encode(), W.public_key, services, now=c.not_before) is None
