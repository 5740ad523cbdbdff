"""HTTP API of discovery through the agent's real aiohttp app: answers and every 4xx."""

from __future__ import annotations

import json
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from agent.dht.identity import Identity
from agent.discovery.api import LOOKUP_PARAMS, BadRequest, check_service, parse_query, parse_report
from agent.httpapi import make_app
from tests.discovery._support import make_discovery, make_record


@pytest.fixture
async def api():
    agent, comp, dht = make_discovery(region="eu-west")
    comp.prober.top = 0                   # no probes of the records' made-up endpoints
    idents = [Identity.generate() for _ in range(4)]
    specs = [("h100", "H100", 80.0, "eu-west", 1.0), ("a100", "A100", 80.0, "us-east", 0.0),
             ("t4", "T4", 16.0, "eu-west", 0.0), ("l40s", "L40S", 48.0, "ap-south", 2.0)]
    for ident, (name, gpu, mem, region, load) in zip(idents, specs, strict=True):
        dht.add(make_record(ident, name=name, gpu=gpu, gpu_memory_gb=mem, region=region,
                            load=load, services=("ocr", "llm") if name != "t4" else ("ocr",)))
    client = TestClient(TestServer(make_app(agent)))
    await client.start_server()
    await comp.start()
    try:
        yield client, comp, idents
    finally:
        await comp.stop()
        await client.close()


async def test_lookup_answer_shape_and_filters(api):
    client, _comp, _ = api
    r = await client.get("/api/services/ocr")
    assert r.status == 200
    body = await r.json()
    assert body["service"] == "ocr" and body["source"] == "dht" and len(body["workers"]) == 4
    for w in body["workers"]:
        assert set(w) == {"id", "name", "endpoint", "gpu", "gpu_memory_gb", "load", "capacity",
                          "region", "age_s", "latency_ms", "score"}
    r = await client.get("/api/services/ocr", params={"region": "EU-West", "limit": "5"})
    names = {w["name"] for w in (await r.json())["workers"]}
    assert names == {"h100", "t4"}
    r = await client.get("/api/services/ocr", params={"gpu": "a100"})
    assert [w["name"] for w in (await r.json())["workers"]] == ["a100"]
    r = await client.get("/api/services/ocr", params={"min_gpu_memory_gb": "48"})
    assert {w["name"] for w in (await r.json())["workers"]} == {"h100", "a100", "l40s"}
    r = await client.get("/api/services/ocr", params={"limit": "1"})
    body = await r.json()
    assert len(body["workers"]) == 1 and body["source"] == "cache"
    r = await client.get("/api/services/nobody")
    assert r.status == 200 and (await r.json())["workers"] == []
    # service names are case-insensitive for people, lowercase on the wire
    r = await client.get("/api/services/OCR", params={"gpu": "a100"})
    body = await r.json()
    assert body["service"] == "ocr" and [w["name"] for w in body["workers"]] == ["a100"]


async def test_service_list(api):
    client, _, _ = api
    r = await client.get("/api/services")
    assert r.status == 200
    assert (await r.json())["services"] == [{"name": "llm", "workers": 3},
                                            {"name": "ocr", "workers": 4}]


@pytest.mark.parametrize("path,params,needle", [
    ("/api/services/OC_R!", {}, "bad service name"),
    ("/api/services/-ocr", {}, "bad service name"),
    ("/api/services/" + "a" * 64, {}, "bad service name"),
    ("/api/services/oc%20r", {}, "bad service name"),
    ("/api/services/ocr", {"limit": "0"}, "limit must be at least 1"),
    ("/api/services/ocr", {"limit": "-3"}, "limit must be at least 1"),
    ("/api/services/ocr", {"limit": "ten"}, "limit must be an integer"),
    ("/api/services/ocr", {"min_gpu_memory_gb": "nan"}, "finite"),
    ("/api/services/ocr", {"min_gpu_memory_gb": "-1"}, "finite number >= 0"),
    ("/api/services/ocr", {"min_gpu_memory_gb": "lots"}, "must be a number"),
    ("/api/services/ocr", {"region": ""}, "region must be"),
    ("/api/services/ocr", {"gpu": "x" * 65}, "gpu must be"),
    ("/api/services/ocr", {"gpu": "a\x01b"}, "gpu must be"),
    ("/api/services/ocr", {"limt": "3"}, "unknown parameter 'limt'"),
    ("/api/services", {"x": "1"}, "no parameters"),
])
async def test_bad_lookups_are_400_json(api, path, params, needle):
    client, _, _ = api
    r = await client.get(path, params=params)
    assert r.status == 400
    assert needle in (await r.json())["error"]


async def test_repeated_parameter_is_400(api):
    client, _, _ = api
    r = await client.get("/api/services/ocr?limit=1&limit=2")
    assert r.status == 400 and "more than once" in (await r.json())["error"]


async def test_report_demotes_and_feeds_latency(api):
    client, _, idents = api
    wid = idents[1].node_id.hex()
    r = await client.post("/api/services/ocr/report", json={"worker_id": wid, "ok": True,
                                                            "latency_ms": 42})
    assert r.status == 200 and (await r.json())["latency_ms"] == 42.0
    body = await (await client.get("/api/services/ocr")).json()
    assert {w["id"]: w["latency_ms"] for w in body["workers"]}[wid] == 42.0
    r = await client.post("/api/services/ocr/report", json={"worker_id": wid, "ok": False})
    out = await r.json()
    assert out["healthy"] is False and out["retry_in_s"] == 15.0
    body = await (await client.get("/api/services/ocr")).json()
    assert wid not in {w["id"] for w in body["workers"]} and len(body["workers"]) == 3


@pytest.mark.parametrize("body,needle", [
    (b"not json", "body must be JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"worker_id": "abc", "ok": true}', "40 hex"),
    (b'{"worker_id": "' + b"zz" * 20 + b'", "ok": true}', "40 hex"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": "yes"}', "ok must be true or false"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": true, "latency_ms": -1}', "between 0"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": true, "latency_ms": true}', "a number"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": true, "latency_ms": 1e400}', "between 0"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": true, "latency": 3}', "unknown key"),
    (b'{"worker_id": "' + b"ab" * 20 + b'", "ok": true, "pad": "' + b"x" * 5000 + b'"}',
     "larger than"),
])
async def test_bad_reports_are_400_json(api, body, needle):
    client, _, _ = api
    r = await client.post("/api/services/ocr/report", data=body)
    assert r.status == 400
    assert needle in (await r.json())["error"]


async def test_bad_service_name_in_report_and_wrong_method(api):
    client, _, _ = api
    r = await client.post("/api/services/Bad!/report", json={"worker_id": "ab" * 20,
                                                             "ok": True})
    assert r.status == 400 and "bad service name" in (await r.json())["error"]
    r = await client.delete("/api/services/ocr")
    assert r.status == 405 and "error" in await r.json()


async def test_stats_and_metrics_carry_discovery_figures(api):
    client, _, _ = api
    for _ in range(3):
        await client.get("/api/services/ocr")
    stats = await (await client.get("/api/dht/stats")).json()
    d = stats["discovery"]
    assert d["lookups"] == 3 and d["by_source"] == {"cache": 2, "dht": 1, "coordinator": 0, "stale": 0}
    assert d["cache_hit_rate"] == round(2 / 3, 4) and d["lookup_p99_ms"] is not None
    text = await (await client.get("/metrics")).text()
    assert 'rma_agent_lookups_total{source="cache"} 2.0' in text
    assert 'rma_agent_lookup_cache_total{result="miss"} 1.0' in text
    assert "rma_agent_lookup_seconds_bucket" in text
    assert 'rma_agent_lookup_dht_total{result="hit"} 1.0' in text


# ---------------------------------------------------------------- input fuzzing
_keys = st.one_of(st.sampled_from(LOOKUP_PARAMS), st.text(max_size=8))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_keys, st.text(max_size=80)), max_size=6))
def test_any_query_string_is_a_query_or_a_clear_400(pairs):
    try:
        q = parse_query(MultiDict(pairs), 50)
    except BadRequest as exc:
        assert str(exc)
    else:
        assert 1 <= q.limit <= 50


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(
    lambda d: json.dumps(d).encode(),
    st.dictionaries(st.sampled_from(["worker_id", "ok", "latency_ms", "x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=45)), max_size=4))))
def test_any_report_body_is_a_report_or_a_clear_400(body):
    try:
        wid, ok, lat = parse_report(body)
    except BadRequest as exc:
        assert str(exc)
    else:
        assert len(wid) == 20 and isinstance(ok, bool)
        assert lat is None or 0 <= lat <= 3_600_000


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=70))
def test_service_names_follow_the_config_rule(name):
    # what a person types is lowercased first (and trimmed); then the one rule applies
    valid = re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name.strip().lower()) is not None
    try:
        got = check_service(name)
    except BadRequest:
        assert not valid
    else:
        assert valid and got == name.strip().lower()
