"""Each upstream kind's reader on its server's real output format (fixtures written from
the servers' documentation: tests/gateway/fixtures/README.md), on malformed, huge and
hostile input (a reader says why and never raises anything else), the health verdicts,
and the merge rule of the worker's load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent.config.model import Upstream
from agent.gateway.kinds import (
    SOURCES,
    BadReading,
    Reading,
    health_verdict,
    llamacpp,
    ollama,
    prom,
    read,
    source_url,
    tgi,
    triton,
    vllm,
)
from agent.gateway.kinds.reading import MAX_BYTES, MAX_COUNT
from agent.gateway.upstream_load import merge_load
from agent.http.load_header import Load

FIX = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIX / name).read_bytes()


# ----------------------------------------------------------------------------- fixtures
def test_vllm_v1_metrics() -> None:
    assert vllm.parse_metrics(fixture("vllm_metrics.txt")) == Reading(
        waiting=7, running=3, kv_cache=0.42)


def test_vllm_v0_metrics_use_the_old_cache_gauge() -> None:
    assert vllm.parse_metrics(fixture("vllm_metrics_v0.txt")) == Reading(
        waiting=0, running=2, kv_cache=0.9)


def test_vllm_sums_engines_and_takes_the_fullest_cache() -> None:
    text = ('vllm:num_requests_waiting{engine="0",model_name="m"} 4\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 46\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 8\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 8\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.97\n')
    assert vllm.parse_metrics(text.encode()) == Reading(waiting=50, running=16,
                                                         kv_cache=0.97)


def test_llamacpp_slots_new_and_old_formats() -> None:
    assert llamacpp.parse_slots(fixture("llamacpp_slots.json")) == Reading(running=1,
                                                                            slots=2)
    assert llamacpp.parse_slots(fixture("llamacpp_slots_old.json")) == Reading(running=2,
                                                                                slots=3)


def test_llamacpp_metrics() -> None:
    assert llamacpp.parse_metrics(fixture("llamacpp_metrics.txt")) == Reading(
        waiting=5, running=2, kv_cache=0.25)
    # /slots and /metrics of one server merge: slots from one, the queue from the other
    both = llamacpp.parse_metrics(fixture("llamacpp_metrics.txt")).over(
        llamacpp.parse_slots(fixture("llamacpp_slots.json")))
    assert both == Reading(waiting=5, running=2, slots=2, kv_cache=0.25)


def test_tgi_metrics() -> None:
    assert tgi.parse_metrics(fixture("tgi_metrics.txt")) == Reading(waiting=4, running=8)


def test_triton_pending_summed_over_models() -> None:
    assert triton.parse_metrics(fixture("triton_metrics.txt")) == Reading(waiting=3)


def test_ollama_ps() -> None:
    assert ollama.parse_ps(fixture("ollama_ps.json")) == Reading(models=1)
    assert ollama.parse_ps(b'{"models": []}') == Reading(models=0)


def test_health_verdicts_on_the_servers_answers() -> None:
    assert health_verdict(200, fixture("llamacpp_health_ok.json")) == ""
    assert health_verdict(200, b"") == ""                      # vLLM, Triton: empty 200
    assert health_verdict(200, fixture("ollama_version.json")) == ""
    assert health_verdict(503, fixture("llamacpp_health_loading.json")) == \
        "HTTP 503: Loading model"
    assert health_verdict(503, b'{"status": "loading model"}') == "HTTP 503: loading model"
    assert health_verdict(503, fixture("ollama_busy.json")).startswith(
        "HTTP 503: server busy")
    assert health_verdict(400, b"") == "HTTP 400"              # Triton not ready
    assert health_verdict(301, b"") == "HTTP 301"              # only 2xx is ready
    hostile = b'{"error": {"message": "\x1b[31mred\\u0000' + b"x" * 5000 + b'"}}'
    why = health_verdict(503, hostile)
    assert why.startswith("HTTP 503") and len(why) < 140 and "\x1b" not in why
    assert health_verdict(503, b"[" * 4096) == "HTTP 503: " + "[" * 120   # too deep: its text
    assert health_verdict(500, b"\xff\xfe{") == "HTTP 500: \ufffd\ufffd{"


def test_source_urls() -> None:
    up = Upstream("http://127.0.0.1:8000/v1", kind="vllm")
    assert [source_url(up, s) for s in SOURCES["vllm"]] == ["http://127.0.0.1:8000/metrics"]
    assert up.health_url == "http://127.0.0.1:8000/health"
    cpp = Upstream("http://127.0.0.1:8080", kind="llamacpp")
    assert [source_url(cpp, s) for s in SOURCES["llamacpp"]] == [
        "http://127.0.0.1:8080/slots", "http://127.0.0.1:8080/metrics"]
    tri = Upstream("http://10.0.0.5:8000", kind="triton")
    assert source_url(tri, SOURCES["triton"][0]) == "http://10.0.0.5:8002/metrics"
    assert tri.health_url == "http://10.0.0.5:8000/v2/health/ready"
    named = Upstream("http://10.0.0.5:8000", kind="triton", metrics_url="http://m:9/metrics")
    assert source_url(named, SOURCES["triton"][0]) == "http://m:9/metrics"
    assert Upstream("http://h:11434", kind="ollama").health_url == "http://h:11434/api/version"
    # generic: unchanged (the base URL, or base URL + health path)
    assert Upstream("http://h:9/p").health_url == "http://h:9/p"
    assert Upstream("http://h:9/p", "/hz").health_url == "http://h:9/p/hz"
    assert Upstream("http://h:9/p", "/hz", kind="vllm").health_url == "http://h:9/p/hz"


# ----------------------------------------------------------------------------- hostile
PROM_READERS = [vllm.parse_metrics, tgi.parse_metrics, triton.parse_metrics,
                llamacpp.parse_metrics]
JSON_READERS = [llamacpp.parse_slots, ollama.parse_ps]

HOSTILE: list[bytes] = [
    b"", b"\x00\xff\xfe garbage", b"# only comments\n# TYPE x gauge\n",
    b"vllm:num_requests_waiting\n", b"vllm:num_requests_waiting{a=\"b\"\n",
    b'vllm:num_requests_waiting{a="}"} NaN\n', b"vllm:num_requests_waiting -3\n",
    b"vllm:num_requests_waiting +Inf\n", b"vllm:num_requests_waiting 1e400\n",
    b"tgi_queue_size abc\n", b"tgi_queue_size NaN\n",
    b"nv_inference_pending_request_count{model=\"\\\"}\"} -1\n",
    b"llamacpp:requests_deferred 1e999\n",
    b"[" * 100_000, b"{" * 50 + b"}" * 50, b"[]", b"{}", b"null", b"3", b'"x"',
    b'[{"id": 0}]', b'[{"is_processing": "yes"}]', b'[{"state": true}]', b"[1, 2, 3]",
    b'{"models": {}}', b'{"models": "many"}', json.dumps([{"state": 0}] * 5000).encode(),
    b"vllm:num_requests_waiting 1\n" * 5000,
    b"x" * (MAX_BYTES + 1),
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_a_bad_reading_never_another_error(body: bytes) -> None:
    for parse in PROM_READERS + JSON_READERS:
        try:
            got = parse(body)
        except BadReading as exc:
            assert str(exc)
            continue
        # what is accepted is bounded and typed
        for v in (got.waiting, got.running, got.slots):
            assert v is None or (isinstance(v, int) and 0 <= v <= MAX_COUNT)
        assert got.kv_cache is None or 0.0 <= got.kv_cache <= 1.0


def test_random_bytes_never_raise_through_read() -> None:
    rng = random.Random(17)
    sources = [s for ss in SOURCES.values() for s in ss]
    seeds = [fixture(n) for n in ("vllm_metrics.txt", "llamacpp_slots.json",
                                  "tgi_metrics.txt", "triton_metrics.txt", "ollama_ps.json")]
    for _ in range(300):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 20)):          # flip, cut, duplicate
            i = rng.randrange(len(body))
            op = rng.random()
            if op < 0.5:
                body[i] = rng.randrange(256)
            elif op < 0.75:
                del body[i:i + rng.randint(1, 40)]
            else:
                body[i:i] = body[i:i + rng.randint(1, 40)]
            if not body:
                body = bytearray(b"x")
        for source in sources:
            got = read(source, bytes(body))
            assert isinstance(got, Reading | str)


def test_huge_counts_are_bounded() -> None:
    got = vllm.parse_metrics(b"vllm:num_requests_waiting 1e12\n")
    assert got.waiting == MAX_COUNT
    assert vllm.parse_metrics(b"vllm:kv_cache_usage_perc 7\nvllm:num_requests_running 1\n"
                              ).kv_cache == 1.0


def test_prometheus_labels_with_quotes_braces_and_timestamps() -> None:
    text = (b'tgi_queue_size{x="a}b",y="q\\"}"} 2 1700000000000\n'
            b"tgi_queue_size_other 99\n"
            b"  tgi_queue_size 3  \n")
    assert prom.samples(text, frozenset({"tgi_queue_size"})) == {"tgi_queue_size": [2.0, 3.0]}


# ----------------------------------------------------------------------------- merge
def test_merge_rule() -> None:
    # no reading: the gateway's own count
    assert merge_load(2, 4, [], upstreams=1) == Load(2, 0, 4)
    # the server's queue is the queue; its running count the inflight
    assert merge_load(1, 4, [Reading(waiting=50, running=3)], upstreams=1) == Load(3, 50, 4)
    # the gateway's requests are among the server's: 4 own, 2 of them queued there
    assert merge_load(4, 4, [Reading(waiting=2, running=2)], upstreams=1) == Load(2, 2, 4)
    # a stale-looking reading never hides the gateway's own requests
    assert merge_load(4, 4, [Reading(waiting=0, running=0)], upstreams=1) == Load(4, 0, 4)
    # no running count (Triton): own requests as inflight, the pending ones as queue
    assert merge_load(1, 4, [Reading(waiting=3)], upstreams=1) == Load(1, 3, 4)
    # slots set the capacity when every upstream states them
    assert merge_load(0, 4, [Reading(running=1, slots=2)], upstreams=1) == Load(1, 0, 2)
    assert merge_load(0, 4, [Reading(running=1, slots=2)], upstreams=2) == Load(1, 0, 4)
    assert merge_load(0, 4, [Reading(slots=8)], upstreams=1) == Load(0, 0, 4)
    # a 503 from the server (Ollama's full queue): full
    full = merge_load(1, 4, [], upstreams=1, full=True)
    assert full.full and full == Load(1, 3, 4)
    # several upstreams: summed
    assert merge_load(0, 8, [Reading(waiting=1, running=2), Reading(waiting=3, running=1)],
                      upstreams=2) == Load(3, 4, 8)
