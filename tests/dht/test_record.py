"""WorkerRecord: signing, verification, canonical encoding, refusal of anything altered."""

import dataclasses
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dht import record as recmod
from agent.dht.identity import Identity
from agent.dht.record import (
    ALL_SERVICES,
    MAX_RECORD_BYTES,
    RecordError,
    WorkerRecord,
    next_seq,
    service_key,
)

IDENT = Identity.generate()
OTHER = Identity.generate()


def make(ident=IDENT, **kw):
    args = dict(name="gpu-box-1", services=("ocr", "llm-inference"),
                endpoint="https://a-b-c.trycloudflare.com", gpu="A100", gpu_memory_gb=80,
                load=0.5, capacity=4, region="eu-west", ttl=300)
    args.update(kw)
    return WorkerRecord.create(ident, **args)


def fresh_verify(rec, now=None):
    recmod._sig_cache.clear()  # force a real signature check
    rec.verify(now)


def test_sign_verify_roundtrip():
    r = make()
    assert r.worker_id == IDENT.node_id and len(r.signature) == 64
    b = r.encode()
    assert len(b) < 300
    r2 = WorkerRecord.decode(b)
    assert r2 == r
    fresh_verify(r2)
    assert r.serves(service_key("ocr")) and r.serves(service_key(ALL_SERVICES))
    assert not r.serves(service_key("asr"))


def test_twenty_records_fit_one_datagram():
    assert 20 * (MAX_RECORD_BYTES + 3) < 8192 - 21 - 1000


@pytest.mark.parametrize("field,value", [
    ("name", "evil"), ("endpoint", "https://evil.example"), ("load", 0.0), ("capacity", 99),
    ("seq", 1), ("services", ("ocr",)), ("withdrawn", True), ("expires_at", None),
])
def test_altered_field_rejected(field, value):
    r = make()
    if field == "expires_at":
        value = r.expires_at + 10
    bad = dataclasses.replace(r, **{field: value})
    with pytest.raises(RecordError, match="bad signature"):
        fresh_verify(WorkerRecord.decode(bad.encode()))


def test_bad_signature_rejected():
    r = make()
    sig = bytes([r.signature[0] ^ 1]) + r.signature[1:]
    with pytest.raises(RecordError, match="bad signature"):
        fresh_verify(dataclasses.replace(r, signature=sig))


def test_forged_worker_id_rejected():
    r = make()
    # claim another worker's id with my key: the id no longer matches the key
    forged = dataclasses.replace(r, worker_id=OTHER.node_id)
    with pytest.raises(RecordError, match="SHA-1"):
        fresh_verify(forged)
    # claim another worker's id *and* key: the signature no longer matches
    forged2 = dataclasses.replace(r, worker_id=OTHER.node_id, public_key=OTHER.public_key)
    with pytest.raises(RecordError, match="bad signature"):
        fresh_verify(forged2)


def test_expired_and_future_rejected():
    now = time.time()
    r = make(ttl=10, now=now - 100)
    with pytest.raises(RecordError, match="expired"):
        fresh_verify(r, now)
    f = make(now=now + 120)
    with pytest.raises(RecordError, match="future"):
        fresh_verify(f, now)
    make(now=now + 20).verify(now)  # within skew
    with pytest.raises(RecordError, match="ttl"):
        make(ttl=7200)


@pytest.mark.parametrize("kw", [
    {"name": "x" * 65}, {"endpoint": "h" * 257}, {"region": "r" * 33}, {"gpu": "g" * 33},
    {"services": tuple(f"s{i}" for i in range(17))}, {"services": ("a" * 64,)},
    {"services": ()}, {"services": ("ocr", "ocr")}, {"services": ("bad name",)},
    {"services": (ALL_SERVICES,)}, {"load": float("nan")}, {"load": -1.0},
    {"capacity": -1}, {"name": "bad\nname"},
    {"endpoint": "h" * 200, "name": "n" * 64, "services": tuple(f"svc-{i}" for i in range(8))},
])
def test_oversized_or_bad_fields_refused_at_create(kw):
    with pytest.raises(RecordError):
        make(**kw)


def test_decode_rejects_garbage_and_non_canonical():
    r = make()
    fields = msgpack.unpackb(r.encode(), raw=False)
    for bad in (b"", b"\xc1", b"\x90", msgpack.packb([1, 2, 3]), b"x" * 1000,
                msgpack.packb({"a": 1}), msgpack.packb(fields[:-1], use_bin_type=True)):
        with pytest.raises(RecordError):
            WorkerRecord.decode(bad)
    # same content, non-minimal int encoding for capacity -> refused as non-canonical
    noncanon = r.encode().replace(b"\x04\xa7eu-west", b"\xcd\x00\x04\xa7eu-west")
    assert noncanon != r.encode()
    with pytest.raises(RecordError, match="canonical"):
        WorkerRecord.decode(noncanon)
    wrongtype = list(fields)
    wrongtype[9] = "4"
    with pytest.raises(RecordError):
        WorkerRecord.decode(msgpack.packb(wrongtype, use_bin_type=True))


def test_tombstone_has_higher_seq():
    r = make()
    t = r.tombstone(IDENT)
    assert t.withdrawn and t.seq > r.seq and t.worker_id == r.worker_id
    fresh_verify(t)


def test_seq_monotonic():
    a = next_seq()
    b = next_seq()
    assert b > a and a >= int(time.time() * 1000) - 1000


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn", "Zs")), max_size=16)
svc = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(name=names, services=st.lists(svc, min_size=1, max_size=4, unique=True),
       endpoint=st.text(st.characters(codec="ascii", min_codepoint=33, max_codepoint=126), max_size=60),
       gpu=names, mem=st.floats(0, 1000), load=st.floats(0, 100), cap=st.integers(0, 1000),
       region=names, seq=st.integers(0, 2**63 - 1), ttl=st.floats(1, 3600), withdrawn=st.booleans())
def test_roundtrip_property(name, services, endpoint, gpu, mem, load, cap, region, seq, ttl,
                            withdrawn):
    try:
        r = make(name=name, services=tuple(services), endpoint=endpoint, gpu=gpu,
                 gpu_memory_gb=mem, load=load, capacity=cap, region=region, seq=seq, ttl=ttl,
                 withdrawn=withdrawn)
    except RecordError:
        return  # a field combination over a limit: refused cleanly, nothing to round-trip
    b = r.encode()
    assert len(b) <= MAX_RECORD_BYTES
    r2 = WorkerRecord.decode(b)
    assert r2 == r and r2.encode() == b
    fresh_verify(r2)
