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
    MAX_CERT,
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


def test_ten_records_fit_one_datagram():
    assert 10 * (MAX_RECORD_BYTES + 3) < 8192 - 21 - 1000


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
    {"endpoint": "h" * 256, "name": "n" * 64,
         "services": tuple(f"service-number-{i:02d}" for i in range(16))},
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
    # the only limits these strategies can break are the per-field byte limits (names
    # of up to 16 characters may take up to 64 UTF-8 bytes); everything else must build
    over = [what for what, v, limit in (("name", name, recmod.MAX_NAME),
                                          ("gpu", gpu, recmod.MAX_GPU),
                                          ("region", region, recmod.MAX_REGION))
            if len(v.encode("utf-8")) > limit]
    if over:
        with pytest.raises(RecordError, match=f"{over[0]} longer than"):
            make(name=name, services=tuple(services), endpoint=endpoint, gpu=gpu,
                 gpu_memory_gb=mem, load=load, capacity=cap, region=region, seq=seq, ttl=ttl,
                 withdrawn=withdrawn)
        return
    r = make(name=name, services=tuple(services), endpoint=endpoint, gpu=gpu,
             gpu_memory_gb=mem, load=load, capacity=cap, region=region, seq=seq, ttl=ttl,
             withdrawn=withdrawn)
    b = r.encode()
    assert len(b) <= MAX_RECORD_BYTES
    r2 = WorkerRecord.decode(b)
    assert r2 == r and r2.encode() == b
    fresh_verify(r2)


# ---------------------------------------------------------------- format 2 and format 1


def test_format2_fields_roundtrip_and_are_signed():
    r = make(refresh=45.0, agent_version="0.2.0", cert=b"\x01" * 200)
    assert r.version == recmod.FORMAT_VERSION == 2
    r2 = WorkerRecord.decode(r.encode())
    assert (r2.refresh, r2.agent_version, r2.cert) == (45.0, "0.2.0", b"\x01" * 200)
    fresh_verify(r2)
    for field, value in (("refresh", 46.0), ("agent_version", "9.9.9"), ("cert", b"")):
        forged = dataclasses.replace(r, **{field: value})
        object.__setattr__(forged, "_encoded", None)
        with pytest.raises(RecordError, match="bad signature"):
            fresh_verify(WorkerRecord.decode(forged.encode()))


def test_default_agent_version_is_this_program():
    from agent import __version__
    assert make().agent_version == __version__


def test_tombstone_keeps_format2_fields():
    r = make(refresh=60.0, cert=b"c" * 10)
    t = r.tombstone(IDENT)
    assert t.withdrawn and (t.refresh, t.agent_version, t.cert) == (60.0, r.agent_version,
                                                                  b"c" * 10)


@pytest.mark.parametrize("kw,match", [
    (dict(refresh=0.5), "refresh"), (dict(refresh=4000.0), "refresh"),
    (dict(refresh=float("nan")), "refresh"), (dict(agent_version="x" * 25), "agent_version"),
    (dict(cert=b"x" * (MAX_CERT + 1)), "cert"), (dict(services=("OCR",)), "bad service name"),
])
def test_format2_limits(kw, match):
    with pytest.raises(RecordError, match=match):
        make(**kw)


def _v1_bytes(ident=IDENT, **over):
    """A format-1 record exactly as agents before format 2 encoded and signed it."""
    now = time.time()
    fields = [1, ident.node_id, ident.public_key, "old-box", ["ocr"], "https://old.example",
              "T4", 16.0, 0.0, 2, "eu", next_seq(), now, now + 300.0, False]
    for i, v in over.items():
        fields[i] = v
    sig = ident.sign(recmod.SIGN_DOMAIN_V1 + msgpack.packb(fields, use_bin_type=True))
    return msgpack.packb([*fields, sig], use_bin_type=True)


def test_format1_records_are_still_read():
    b = _v1_bytes()
    r = WorkerRecord.decode(b)
    fresh_verify(r)
    assert r.version == 1 and r.refresh == recmod.LEGACY_REFRESH
    assert r.agent_version == "" and r.cert == b"" and r.encode() == b
    assert recmod.decode_verified(b).name == "old-box"


def test_format1_signed_under_v2_domain_is_refused():
    now = time.time()
    fields = [1, IDENT.node_id, IDENT.public_key, "x", ["ocr"], "", "", 0.0, 0.0, 1, "",
              next_seq(), now, now + 300.0, False]
    sig = IDENT.sign(recmod.SIGN_DOMAIN + msgpack.packb(fields, use_bin_type=True))
    r = WorkerRecord.decode(msgpack.packb([*fields, sig], use_bin_type=True))
    with pytest.raises(RecordError, match="bad signature"):
        fresh_verify(r)


@pytest.mark.parametrize("obj", [[], [3, 1], [2] * 16, [1] * 19, ["2"] + [0] * 18])
def test_wrong_shapes_refused(obj):
    with pytest.raises(RecordError):
        WorkerRecord.decode(msgpack.packb(obj, use_bin_type=True))


def test_service_names_are_lowercase_everywhere():
    from agent.config import SERVICE_RE as CONFIG_RE
    assert recmod.normalize_service(" OCR ") == "ocr"
    assert recmod.valid_service_name("ocr") and not recmod.valid_service_name("Ocr")
    for name in ("ocr", "Ocr", "llm-inference", "a" * 63, "a" * 64, "-x", "x_y.z"):
        assert recmod.valid_service_name(name) == bool(CONFIG_RE.fullmatch(name))
