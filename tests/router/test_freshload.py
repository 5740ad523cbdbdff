"""The ``RMA-Load`` grammar and the router's freshest-load table (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.http.load_header import Load, format_load, parse_load
from agent.router.freshload import STALE_S, FreshLoads


def test_format_and_parse_round_trip() -> None:
    load = Load(3, 1, 4)
    assert format_load(load) == "inflight=3; queue=1; capacity=4"
    assert parse_load(format_load(load)) == load
    assert load.busy == 4 and load.full
    assert not Load(2, 1, 4).full and not Load(9, 9, 0).full


@pytest.mark.parametrize("value", [
    "inflight=3;queue=1;capacity=4", " inflight = 3 ;\tqueue=1 ; capacity=4 ",
    "capacity=4; queue=1; inflight=3", "inflight=3; queue=1; capacity=4; kv_cache=87",
    "inflight=03; queue=1; capacity=4; x-future=0",
])
def test_parse_accepts_the_grammar_and_ignores_unknown_keys(value: str) -> None:
    assert parse_load(value) == Load(3, 1, 4)


@pytest.mark.parametrize("value", [
    None, "", ";", "inflight=3; queue=1", "inflight=3; queue=1; capacity=",
    "inflight=-1; queue=1; capacity=4", "inflight=1.5; queue=1; capacity=4",
    "inflight=3; queue=1; capacity=4; inflight=2", "inflight=3, queue=1, capacity=4",
    "Inflight=3; queue=1; capacity=4", "inflight=3; queue=1; capacity=4;",
    "inflight=1e3; queue=1; capacity=4", "inflight=9999999999; queue=0; capacity=4",
    "inflight=3; queue=1; capacity=4; " + "x=1; " * 60, "inflight=٣; queue=1; capacity=4",
])
def test_parse_refuses_anything_else(value: str | None) -> None:
    assert parse_load(value) is None


@dataclass
class Rec:
    worker_id: bytes
    load: float
    capacity: float
    issued_at: float


def test_the_fresher_of_record_and_header_wins_and_bad_headers_are_counted() -> None:
    fl = FreshLoads()
    w = b"\x01" * 32
    fl.record(Rec(w, 1.0, 4, issued_at=100.0))
    seen = fl.get(w)
    assert seen is not None and seen.source == "record" and seen.load == Load(1, 0, 4)
    assert fl.header(w, "inflight=4; queue=2; capacity=4", now=110.0) == Load(4, 2, 4)
    fl.record(Rec(w, 0.0, 4, issued_at=105.0))             # older than the header: kept
    seen = fl.get(w)
    assert seen is not None and seen.source == "header" and seen.age(112.0) == 2.0
    assert fl.full(w, 0, 112.0)
    assert fl.header(w, "inflight=lots", now=111.0) is None   # ignored, counted
    assert fl.header(w, None, now=111.0) is None
    assert (fl.headers, fl.malformed, fl.missing) == (1, 1, 1)
    assert fl.get(w) is seen
    fl.record(Rec(w, 0.0, 4, issued_at=120.0))             # newer record: it wins
    seen = fl.get(w)
    assert seen is not None and seen.source == "record" and not fl.full(w, 0, 121.0)
    assert fl.full(w, 4, 121.0)                            # this router alone fills it
    fl.header(w, "inflight=4; queue=0; capacity=4", now=130.0)
    assert not fl.full(w, 0, 130.0 + STALE_S + 1)          # too old to say "full"
    assert fl.stats(131.0)["workers"][w.hex()]["source"] == "header"


def test_the_table_is_bounded() -> None:
    fl = FreshLoads(max_workers=3)
    for i in range(10):
        fl.header(bytes([i]) * 32, "inflight=0; queue=0; capacity=1", now=float(i))
    assert len(fl.stats(10.0)["workers"]) == 3 and fl.get(bytes([9]) * 32) is not None
