"""Ranking properties (hypothesis): what is never returned, what wins, the top-3 draw."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.discovery.gpu_classes import GpuScorer
from agent.discovery.latency import LatencyTracker
from agent.discovery.select import CandidateSet, Query, pick_first
from tests.discovery._support import make_record

NOW = 1_800_000_000.0
MAX_AGE = 60.0
SCORER = GpuScorer()
GPUS = ["H200", "H100", "A100", "L40S", "A10", "V100", "RTX 4090", "RTX 3090", "T4", "CPU",
        "MysteryCard"]
REGIONS = ["", "eu-west", "us-east", "ap-south"]


@dataclass(frozen=True)
class Rec:
    """The record fields selection reads (the real, signed WorkerRecord is used in the
    component tests; here hypothesis needs thousands of arbitrary ones)."""

    worker_id: bytes
    name: str
    services: tuple[str, ...]
    endpoint: str
    gpu: str
    gpu_memory_gb: float
    load: float
    capacity: int
    region: str
    seq: int
    issued_at: float
    expires_at: float
    withdrawn: bool


@st.composite
def workers(draw, n_max: int = 14):
    n = draw(st.integers(1, n_max))
    out = []
    failing = set()
    for i in range(n):
        cap = draw(st.integers(0, 16))
        wid = i.to_bytes(20, "big")
        out.append(Rec(
            worker_id=wid, name=f"w{i}", services=("ocr",) if draw(st.booleans()) or i % 3
            else ("llm",), endpoint=f"http://127.0.0.1:{1000 + i}",
            gpu=draw(st.sampled_from(GPUS)), gpu_memory_gb=float(draw(st.integers(0, 160))),
            load=float(draw(st.integers(0, max(cap, 1) + 2))), capacity=cap,
            region=draw(st.sampled_from(REGIONS)), seq=draw(st.integers(1, 5)),
            issued_at=NOW - draw(st.floats(-5, 120)),
            expires_at=NOW + draw(st.floats(-30, 300)),
            withdrawn=draw(st.integers(0, 5)) == 0,
        ))
        if draw(st.integers(0, 4)) == 0:
            failing.add(wid)
    return out, failing


def tracker_with(failing: set[bytes], latencies: dict[bytes, float] | None = None):
    t = LatencyTracker()
    for wid, ms in (latencies or {}).items():
        t.record_success(wid, ms)
    for wid in failing:
        t.record_failure(wid, NOW - 1.0)   # back-off runs until NOW + 14
    return t


def eligible(r: Rec, failing: set[bytes], q: Query) -> bool:
    """The documented rule, written independently of the implementation."""
    return ("ocr" in r.services and not r.withdrawn and r.expires_at > NOW
            and NOW - r.issued_at <= MAX_AGE and r.worker_id not in failing
            and (q.region is None or r.region.lower() == q.region.lower())
            and (q.gpu is None or SCORER.classify(r.gpu) == SCORER.classify(q.gpu))
            and (q.min_gpu_memory_gb is None or r.gpu_memory_gb >= q.min_gpu_memory_gb))


queries = st.builds(
    Query, limit=st.integers(1, 20),
    region=st.one_of(st.none(), st.sampled_from([*REGIONS[1:], "EU-WEST"])),
    gpu=st.one_of(st.none(), st.sampled_from(["a100", "H100", "T4", "cpu"])),
    min_gpu_memory_gb=st.one_of(st.none(), st.sampled_from([0.0, 16.0, 40.0, 100.0])),
    caller_region=st.sampled_from(REGIONS),
)


@settings(max_examples=300, deadline=None)
@given(workers(), queries, st.integers(0, 2**32))
def test_rank_keeps_every_eligible_worker_and_draws_only_among_the_best_three(ws, q, seed):
    """Two properties of ``rank`` on the same drawn sets (one draw serves both: drawing
    the workers is most of the cost): what comes back, and in which order."""
    recs, failing = ws
    cs = CandidateSet("ocr", recs, SCORER, NOW, MAX_AGE)
    tracker = tracker_with(failing)
    _only_eligible_and_all_of_them(cs, recs, failing, q, tracker, seed)
    _drawn_among_the_best_three_rest_in_order(cs, q, tracker, seed)


def _only_eligible_and_all_of_them(cs, recs, failing, q, tracker, seed) -> None:
    out = cs.rank(NOW, q, tracker, random.Random(seed))
    got = [cs.ids[i] for i, _ in out]
    assert len(got) == len(set(got)) <= q.limit
    want = {r.worker_id for r in recs if eligible(r, failing, q)}
    # never a stale, expired, withdrawn, failing, other-service or filtered-out worker
    assert set(got) <= want
    # and nothing eligible is left out while there is room
    assert len(got) == min(q.limit, len(want))
    for i, _ in out:
        if q.region is not None:
            assert cs.records[i].region.lower() == q.region.lower()


def _drawn_among_the_best_three_rest_in_order(cs, q, tracker, seed) -> None:
    plain = cs.rank(NOW, Query(50, q.region, q.gpu, q.min_gpu_memory_gb, q.caller_region),
                    tracker, None)
    scores = [s for _, s in plain]
    assert scores == sorted(scores, reverse=True)          # deterministic order: best first
    drawn = cs.rank(NOW, q, tracker, random.Random(seed))
    if not plain:
        assert drawn == []
        return
    top3 = [i for i, _ in plain[:3]]
    first = drawn[0][0]
    assert first in top3
    rest = [i for i, _ in plain if i != first]
    assert [i for i, _ in drawn[1:]] == rest[:q.limit - 1]
    # the same seed gives the same answer
    assert cs.rank(NOW, q, tracker, random.Random(seed)) == drawn


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(GPUS), st.integers(1, 64), st.data(), st.sampled_from(REGIONS),
       st.floats(0, 500), st.floats(0, 60))
def test_lower_load_wins_when_all_else_is_equal(gpu, cap, data, region, lat, age):
    lo = data.draw(st.integers(0, cap - 1))
    hi = data.draw(st.integers(lo + 1, cap))
    base = dict(name="w", services=("ocr",), endpoint="http://x", gpu=gpu, gpu_memory_gb=24.0,
                capacity=cap, region=region, seq=1, issued_at=NOW - age,
                expires_at=NOW + 100, withdrawn=False)
    a = Rec(worker_id=b"\x01" * 20, load=float(hi), **base)   # busier one listed first
    b = Rec(worker_id=b"\x02" * 20, load=float(lo), **base)
    tracker = tracker_with(set(), {a.worker_id: lat, b.worker_id: lat})
    cs = CandidateSet("ocr", [a, b], SCORER, NOW, MAX_AGE)
    order = [cs.ids[i] for i, _ in cs.rank(NOW, Query(caller_region=region), tracker, None)]
    assert order == [b.worker_id, a.worker_id]


def test_better_gpu_region_and_latency_each_win_alone():
    def rec(i, **kw):
        base = dict(worker_id=bytes([i]) * 20, name=f"w{i}", services=("ocr",),
                    endpoint="http://x", gpu="A100", gpu_memory_gb=80.0, load=1.0, capacity=4,
                    region="us-east", seq=1, issued_at=NOW, expires_at=NOW + 100,
                    withdrawn=False)
        base.update(kw)
        return Rec(**base)

    def best(recs, tracker=None, caller=""):
        cs = CandidateSet("ocr", recs, SCORER, NOW, MAX_AGE)
        return cs.records[cs.rank(NOW, Query(caller_region=caller), tracker, None)[0][0]].name

    assert best([rec(1, gpu="T4"), rec(2, gpu="H200")]) == "w2"
    assert best([rec(1), rec(2, region="eu-west")], caller="eu-west") == "w2"
    slow_fast = tracker_with(set(), {bytes([1]) * 20: 400.0, bytes([2]) * 20: 5.0})
    assert best([rec(1), rec(2)], slow_fast) == "w2"
    assert best([rec(1, issued_at=NOW - 50), rec(2, issued_at=NOW - 1)]) == "w2"


def test_draw_spreads_the_first_slot_over_the_best_three():
    recs = [Rec(worker_id=bytes([i]) * 20, name=f"w{i}", services=("ocr",), endpoint="http://x",
                gpu="A100", gpu_memory_gb=80.0, load=float(i), capacity=10, region="",
                seq=1, issued_at=NOW, expires_at=NOW + 100, withdrawn=False)
            for i in range(6)]
    cs = CandidateSet("ocr", recs, SCORER, NOW, MAX_AGE)
    rng = random.Random(1)
    firsts = [cs.records[cs.rank(NOW, Query(limit=1), None, rng)[0][0]].name
              for _ in range(600)]
    counts = {n: firsts.count(n) for n in set(firsts)}
    assert set(counts) == {"w0", "w1", "w2"}
    assert all(150 < c < 250 for c in counts.values()), counts   # uniform: ~200 each


def test_pick_first_keeps_the_others_in_order():
    assert pick_first([], random.Random(0)) == []
    assert pick_first([5], random.Random(0)) == [5]
    seen = set()
    for seed in range(50):
        out = pick_first([1, 2, 3, 4, 5], random.Random(seed))
        seen.add(out[0])
        assert out[3:] == [4, 5]
        assert sorted(out[:3]) == [1, 2, 3]
        assert [x for x in [1, 2, 3] if x != out[0]] == out[1:3]
    assert seen == {1, 2, 3}


def test_newest_seq_per_worker_and_service_membership_with_real_records():
    from agent.dht.identity import Identity
    ident = Identity.generate()
    old = make_record(ident, load=3.0, seq=10, now=NOW)
    new = make_record(ident, load=0.0, seq=11, now=NOW)
    other = make_record(services=("llm",), now=NOW)
    cs = CandidateSet("ocr", [new, other, old], SCORER, NOW + 1, MAX_AGE)
    assert len(cs) == 1 and cs.records[0].seq == 11
    (i, score), = cs.rank(NOW + 1, Query(), None, None)
    view = cs.view(i, NOW + 1, score)
    assert view["id"] == ident.node_id.hex() and view["load"] == 0.0
    assert view["latency_ms"] is None and view["age_s"] == 1.0
    assert set(view) == {"id", "name", "endpoint", "gpu", "gpu_memory_gb", "load", "capacity",
                         "region", "age_s", "latency_ms", "score"}


def test_future_issued_record_within_skew_is_fresh_not_dropped():
    r = Rec(worker_id=b"\x09" * 20, name="w", services=("ocr",), endpoint="http://x",
            gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1, region="", seq=1,
            issued_at=NOW + 10, expires_at=NOW + 300, withdrawn=False)
    cs = CandidateSet("ocr", [r], SCORER, NOW, MAX_AGE)
    out = cs.rank(NOW, Query(), None, None)
    assert len(out) == 1 and cs.view(out[0][0], NOW, out[0][1])["age_s"] == 0.0


def test_expiry_and_staleness_apply_at_ranking_time_too():
    r = Rec(worker_id=b"\x09" * 20, name="w", services=("ocr",), endpoint="http://x",
            gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1, region="", seq=1,
            issued_at=NOW, expires_at=NOW + 30, withdrawn=False)
    cs = CandidateSet("ocr", [r], SCORER, NOW, MAX_AGE)
    assert cs.rank(NOW + 29, Query(), None, None)
    assert cs.rank(NOW + 31, Query(), None, None) == []          # expired
    r2 = Rec(**{**r.__dict__, "expires_at": NOW + 300})
    cs2 = CandidateSet("ocr", [r2], SCORER, NOW, MAX_AGE)
    assert cs2.rank(NOW + 60, Query(), None, None)
    assert cs2.rank(NOW + 61, Query(), None, None) == []         # stale
    assert cs2.fresh_until == NOW + 60
