""""Why this worker": score components add up to the kernels' score, reasons for exclusion,
and ``?explain=1`` through the agent's real aiohttp app."""

from __future__ import annotations

import math
import os
import random
import struct
from array import array

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

import _fast
from agent.dht.identity import Identity
from agent.discovery.explain import COMPONENTS, explain_set, score_terms, terms_sum
from agent.discovery.gpu_classes import GpuScorer
from agent.discovery.select import DEFAULT_WEIGHTS, CandidateSet, Query
from agent.httpapi import make_app
from tests.discovery._support import make_discovery, make_record


def _impls() -> dict[str, object]:
    """Both kernels by name; the Cython one may be missing except in CI (which builds
    the kernels: missing there is a failure, not a skip)."""
    out: dict[str, object] = {"python": _fast.pure}
    if _fast.compiled is not None:
        out["cython"] = _fast.compiled
    elif os.environ.get("CI") == "true":
        out["cython-missing"] = None
    return out


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


odd = st.sampled_from([0.0, -0.0, 1.0, 4.0, 50.0, 1e-300, 1e300, math.inf, -1.0])
num = st.one_of(odd, st.floats(-10, 1000, allow_nan=False), st.floats(0, 1e6, allow_nan=False))


@st.composite
def rows(draw):
    n = draw(st.integers(1, 40))
    col = st.lists(num, min_size=n, max_size=n)
    load, cap, gpu, lat = draw(col), draw(col), draw(col), draw(col)
    gpu = [g if math.isfinite(g) else 0.5 for g in gpu]
    max_age = draw(st.sampled_from([0.0, 6.0, 60.0, 1e-3]))
    age = draw(st.lists(st.floats(0, max(max_age, 1.0), allow_nan=False), min_size=n,
                        max_size=n))
    region = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    weights = draw(st.one_of(st.just(DEFAULT_WEIGHTS),
                             st.tuples(*[st.floats(-2, 2, allow_nan=False)] * 5)))
    return load, cap, gpu, age, lat, region, weights, max_age


@settings(max_examples=200, deadline=None)
@given(data=rows())
def test_components_add_up_to_the_kernel_score_bit_for_bit(data):
    """Both kernels on each drawn table (one draw serves both: drawing is the cost)."""
    load, cap, gpu, age, lat, region, weights, max_age = data
    n = len(load)
    for name, impl in _impls().items():
        assert impl is not None, "compiled kernels are missing (CI builds them)"
        scored = impl.score_values(array("d", load), array("d", cap), array("d", gpu),
                                   array("d", age), array("d", lat), region, bytes([1]) * n,
                                   weights, max_age)
        for i, score in scored:
            terms = score_terms(load[i], cap[i], gpu[i], age[i], lat[i], bool(region[i]),
                                weights, max_age)
            assert set(terms) == set(COMPONENTS)
            assert bits(terms_sum(terms)) == bits(score), (name, i, terms, score)


def _set(records, now, scorer=None):
    return CandidateSet("ocr", records, scorer or GpuScorer({}), now, 60.0)


def test_explained_ranking_matches_the_lookup_order_and_scores():
    now = 1_800_000_000.0
    recs = [make_record(name=f"w{i}", load=float(i % 4), capacity=4, gpu=g, region=r,
                        now=now - i)
            for i, (g, r) in enumerate([("H100", "eu-west"), ("A100", "us-east"),
                                        ("T4", "eu-west"), ("L40S", "ap-south")])]
    cs = _set(recs, now)
    q = Query(limit=10, caller_region="eu-west")
    plain = cs.rank(now, q)                    # what the lookup ranks (no draw)
    out = explain_set(cs, q, now, None, GpuScorer({}))
    assert [w["id"] for w in out["workers"]] == [cs.ids[i].hex() for i, _ in plain]
    for w, (_, score) in zip(out["workers"], plain, strict=True):
        assert w["score"] == score
        assert bits(terms_sum(w["components"])) == bits(score)
        assert w["components_sum"] == score
        assert w["components"]["region"] == (0.4 if w["region"] == "eu-west" else 0.0)
    assert out["excluded"] == []


def test_components_add_up_when_workers_refresh_at_other_intervals_than_the_caller():
    """Records carry their own ``refresh``; the kernel is given each record's age scaled
    to its own max age. The parts must add up to that score (they used the raw age over
    the caller's max age), and a worker with a long refresh is not called "stale" for
    an age its own refresh allows."""
    now = 1_800_000_000.0
    recs = [make_record(name="r10", refresh=10.0, now=now - 15, load=1.0),
            make_record(name="r30", refresh=30.0, now=now - 15, load=2.0),
            make_record(name="r120", refresh=120.0, now=now - 80, load=3.0)]
    cs = _set(recs, now)                       # the caller's max age: 60 s
    assert len(cs) == 3
    q = Query(limit=2)
    out = explain_set(cs, q, now, None, GpuScorer({}))
    plain = dict(cs.ranked(now, q))
    for w in out["workers"]:
        i = cs.index[bytes.fromhex(w["id"])]
        assert bits(terms_sum(w["components"])) == bits(plain[i]), w["name"]
    ages = {w["name"]: w["components"]["age"] for w in out["workers"]}
    assert ages["r10"] == pytest.approx(-0.1 * 15 / 20)     # 15 s of its own 20 s
    (x,) = out["excluded"]
    assert x["name"] == "r120" and x["reason"].startswith("beyond limit=2"), x
    # a fresh DHT answer holding a record the cached set does not: judged by its refresh
    late = make_record(name="late", refresh=120.0, now=now - 90)
    out = explain_set(_set([], now), q, now, None, GpuScorer({}), raw=[late])
    assert out["excluded"][0]["reason"].startswith("newer than the cached answer"), out


def test_every_worker_not_offered_says_which_rule_left_it_out():
    from agent.discovery.latency import LatencyTracker

    now = 1_800_000_000.0
    ids = [Identity.generate() for _ in range(7)]
    recs = [
        make_record(ids[0], name="ok-eu", region="eu-west", now=now),
        make_record(ids[1], name="us", region="us-east", now=now),
        make_record(ids[2], name="t4", gpu="T4", gpu_memory_gb=16, region="eu-west", now=now),
        make_record(ids[3], name="banned", region="eu-west", now=now),
        make_record(ids[4], name="ok2", region="eu-west", now=now, load=3),
    ]
    stale = make_record(ids[5], name="stale", region="eu-west", now=now - 100)
    gone = make_record(ids[6], name="gone", region="eu-west", now=now)
    tracker = LatencyTracker()
    tracker.record_failure(ids[3].node_id, now)
    cs = _set(recs, now)
    q = Query(limit=1, region="eu-west", min_gpu_memory_gb=40)
    out = explain_set(cs, q, now, tracker, GpuScorer({}), raw=[*recs, stale],
                      withdrawn=[ids[6].node_id])
    assert [w["name"] for w in out["workers"]] == ["ok-eu"]
    why = {x["name"] or x["id"]: x["reason"] for x in out["excluded"]}
    assert why["us"].startswith("region filter")
    assert why["t4"].startswith("gpu memory filter")
    assert why["banned"].startswith("backed off after 1 failure")
    assert why["ok2"].startswith("beyond limit=1")
    assert why["stale"].startswith("stale")
    assert why[gone.worker_id.hex()].startswith("withdrawn")
    states = {x["name"]: x["state"] for x in out["excluded"]}
    assert states["banned"] == "backed off"


def test_a_failed_ownership_proof_is_its_own_state_and_reason():
    import time

    from agent.discovery.latency import LatencyTracker

    now = time.time()
    ident = Identity.generate()
    cs = _set([make_record(ident, name="p", now=now), make_record(name="q", now=now)], now)
    tracker = LatencyTracker()
    tracker.record_proof(ident.node_id, False, now, 60.0)
    out = explain_set(cs, Query(limit=5), now, tracker, GpuScorer({}))
    assert [w["name"] for w in out["workers"]] == ["q"]
    (x,) = out["excluded"]
    assert x["state"] == "proof failed"
    assert x["reason"].startswith("endpoint ownership proof failed")


def test_exclusions_are_itemised_up_to_a_bound_and_counted():
    now = 1_800_000_000.0
    cs = _set([make_record(name=f"w{i}", now=now) for i in range(6)], now)
    out = explain_set(cs, Query(limit=1), now, None, GpuScorer({}), max_excluded=2)
    assert len(out["workers"]) == 1
    assert len(out["excluded"]) == 2 and out["excluded_total"] == 5


@pytest.fixture
async def api():
    agent, comp, dht = make_discovery(region="eu-west")
    comp.prober.top = 0
    rng = random.Random(3)
    for i in range(6):
        dht.add(make_record(name=f"w{i}", gpu=rng.choice(["H100", "A100", "T4"]),
                            region=rng.choice(["eu-west", "us-east"]), load=float(i % 3),
                            capacity=4))
    client = TestClient(TestServer(make_app(agent)))
    await client.start_server()
    await comp.start()
    try:
        yield client, comp
    finally:
        await comp.stop()
        await client.close()


async def test_explain_over_http_adds_components_that_sum_to_the_score(api):
    client, comp = api
    measured = None
    for _ in range(2):
        r = await client.get("/api/services/ocr?explain=1&region=eu-west")
        assert r.status == 200
        body = await r.json()
        assert body["explain"] is True and body["workers"]
        for w in body["workers"]:
            assert set(w["components"]) == set(COMPONENTS)
            assert bits(terms_sum(w["components"])) == bits(w["score"])
            if w["id"] == measured:       # a measured latency replaces the 0.5 default
                assert w["components"]["latency"] == -(0.5 * (12.0 / 62.0))
        assert {w["region"] for w in body["workers"]} == {"eu-west"}
        assert body["excluded"]
        assert all(x["reason"].startswith("region filter") for x in body["excluded"])
        plain = await (await client.get("/api/services/ocr?region=eu-west")).json()
        assert sorted(w["id"] for w in plain["workers"]) == \
            sorted(w["id"] for w in body["workers"])
        measured = body["workers"][-1]["id"]
        comp.tracker.record_success(bytes.fromhex(measured), 12.0)


@pytest.mark.parametrize("query", ["explain=2", "explain=1&explain=1", "explain=yes&bogus=1"])
async def test_bad_explain_is_a_400_json(api, query):
    client, _ = api
    r = await client.get(f"/api/services/ocr?{query}")
    assert r.status == 400
    assert "error" in await r.json()
