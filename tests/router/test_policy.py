"""The routed-request selection policy (agent/router/policy.py), pure: a manual clock,
a seeded generator, no I/O."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from agent.http.load_header import Load
from agent.router import policy as P
from agent.router.freshload import Seen
from agent.router.policy import RoutePolicy, retry_after_s


@dataclass
class Rec:
    worker_id: bytes
    capacity: float = 4.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


SVC = "llm"
A, B, C, D = (bytes([i]) * 20 for i in range(1, 5))


def make(seed: int = 1) -> tuple[RoutePolicy, Clock]:
    clock = Clock()
    return RoutePolicy(clock=clock, wall=clock, rng=random.Random(seed)), clock


def loads(clock: Clock, **by: Load) -> dict[bytes, Seen]:
    names = {"a": A, "b": B, "c": C, "d": D}
    return {names[k]: Seen(v, clock.t, "header") for k, v in by.items()}


def firsts(pol: RoutePolicy, recs: list[Rec], seen: dict[bytes, Seen],
           outstanding: dict[bytes, int] | None = None, n: int = 400) -> Counter[bytes]:
    out: Counter[bytes] = Counter()
    for _ in range(n):
        order = pol.order(SVC, recs, outstanding or {}, seen.get)
        out[order[0].worker_id] += 1
    return out


def test_two_choices_pick_the_lower_cost_of_the_pair() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    seen = loads(clock, a=Load(3, 0, 4), b=Load(0, 0, 4))
    # with two candidates both are always drawn: the cheaper one always goes first
    assert firsts(pol, recs, seen) == {B: 400}
    assert pol.picks["p2c"] == 400
    # the loser is the retry, not dropped
    assert [r.worker_id for r in pol.order(SVC, recs, {}, seen.get)] == [B, A]


def test_two_choices_spread_and_never_pick_the_worst() -> None:
    pol, clock = make(7)
    recs = [Rec(A), Rec(B), Rec(C), Rec(D)]
    seen = loads(clock, a=Load(0, 0, 4), b=Load(1, 0, 4), c=Load(2, 0, 4), d=Load(3, 0, 4))
    got = firsts(pol, recs, seen)
    # the most loaded is in every pair it is drawn for, and always loses
    assert D not in got
    # the least loaded wins every pair it is in, but is not in every pair: no herding
    assert got[A] > got[B] > got[C] > 0
    assert got[A] < 400


def test_own_outstanding_requests_count_in_the_cost() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    seen = loads(clock, a=Load(1, 0, 4), b=Load(1, 0, 4))
    assert firsts(pol, recs, seen, {A: 3}, n=50) == {B: 50}


def test_a_full_queue_gets_nothing_while_another_has_room() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B), Rec(C)]
    # A reports a full queue; B and C are busier per slot on the cost, but have room
    seen = loads(clock, a=Load(2, 1, 2), b=Load(3, 0, 4), c=Load(3, 0, 4))
    pol.success(A, SVC, 0.001)                   # A even looks fast
    pol.success(B, SVC, 0.5)
    pol.success(C, SVC, 0.5)
    got = firsts(pol, recs, seen)
    assert got[A] == 0 and got[B] > 0 and got[C] > 0
    # when nobody has room, the full worker is still offered (last resort, by cost)
    seen = loads(clock, a=Load(2, 1, 2), b=Load(4, 3, 4), c=Load(4, 5, 4))
    order = pol.order(SVC, recs, {}, seen.get)
    assert len(order) == 3 and pol.picks["hot"] == 1


def test_this_routers_outstanding_at_capacity_makes_a_worker_hot() -> None:
    pol, _clock = make()
    recs = [Rec(A, 2), Rec(B, 2)]
    assert firsts(pol, recs, {}, {A: 2, B: 1}, n=50) == {B: 50}


def test_stale_reports_are_read_conservatively() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    # A's report says "idle" but is old; B's fresh report says 1 of 4 busy
    seen = {A: Seen(Load(0, 0, 4), clock.t - 30.0, "record"),
            B: Seen(Load(1, 0, 4), clock.t, "header")}
    a = pol.parts(SVC, A, 4, 0, seen[A])
    b = pol.parts(SVC, B, 4, 0, seen[B])
    assert a["cost"] > b["cost"]                 # old "idle" counts as half full
    assert firsts(pol, recs, seen, n=50) == {B: 50}
    # a report fades toward half full over the worker's time scale: a full one is
    # hot while new, half full once old (never shut out for good)
    full = Seen(Load(4, 2, 4), clock.t, "record")
    assert pol.parts(SVC, A, 4, 0, full)["hot"] and pol.parts(SVC, A, 4, 0, full)["load_est"] == 6
    clock.t += P.LOAD_TAU_S
    mid = pol.parts(SVC, A, 4, 0, full)["load_est"]
    assert 2.0 < mid < 6.0
    clock.t += 30.0
    assert pol.parts(SVC, A, 4, 0, full)["load_est"] == pytest.approx(2.0, abs=1e-3)
    assert not pol.parts(SVC, A, 4, 0, full)["hot"]


def test_a_headers_own_request_is_not_counted() -> None:
    pol, clock = make()
    # the gateway stamps RMA-Load while the answered request is still in flight there
    seen = Seen(Load(2, 0, 2), clock.t, "header")
    p = pol.parts(SVC, A, 2, 0, seen)
    assert p["load_est"] == 1 and not p["hot"]
    p = pol.parts(SVC, A, 2, 0, Seen(Load(2, 1, 2), clock.t, "header"))
    assert p["load_est"] == 2 and p["hot"]


def test_peak_ewma_reacts_to_a_slow_sample_at_once_and_decays() -> None:
    pol, clock = make()
    for _ in range(5):
        pol.success(A, SVC, 0.010)
        clock.t += 1.0
    base = pol.parts(SVC, A, 4, 0, None)["ewma_ms"]
    assert 5.0 < base <= 10.0
    pol.success(A, SVC, 0.500)                   # one slow answer: counts at once
    assert pol.parts(SVC, A, 4, 0, None)["ewma_ms"] == pytest.approx(500.0)
    pol.success(A, SVC, 0.010)                   # a fast one right after: barely moves
    assert pol.parts(SVC, A, 4, 0, None)["ewma_ms"] > 400.0
    clock.t += P.EWMA_TAU_S                      # no samples for one time constant
    later = pol.parts(SVC, A, 4, 0, None)["ewma_ms"]
    assert later < 500.0 / 2.5
    clock.t += 1.0
    pol.success(A, SVC, 0.010)                   # fast samples pull it back down
    assert pol.parts(SVC, A, 4, 0, None)["ewma_ms"] < later
    # per service: another service of the same worker is unmeasured
    assert pol.parts("other", A, 4, 0, None)["measured"] is False


def test_fast_failures_are_penalised_never_preferred() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    seen = loads(clock, a=Load(0, 0, 4), b=Load(2, 0, 4))
    pol.success(B, SVC, 0.200)
    pol.success(A, SVC, 0.200)
    pol.failure(A, SVC)                          # fails in no time: must not look fast
    p = pol.parts(SVC, A, 4, 0, seen[A])
    assert p["ewma_ms"] >= P.FAILURE_MS and p["penalty"] == pytest.approx(P.BAN_BASE_S)
    assert firsts(pol, recs, seen, n=50) == {B: 50}
    assert pol.picks["p2c"] == 0 and pol.picks["only"] == 50
    # the ban doubles on each failure in a row, bounded
    clock.t += 1.5
    pol.failure(A, SVC)
    assert pol.parts(SVC, A, 4, 0, None)["penalty"] == pytest.approx(2 * P.BAN_BASE_S)
    for _ in range(20):
        pol.failure(A, SVC)
    assert pol.parts(SVC, A, 4, 0, None)["penalty"] == pytest.approx(P.BAN_MAX_S)
    # a 502 answer is a failure too; a success ends the streak
    clock.t += P.BAN_MAX_S + 1
    pol.answered(A, SVC, 200, None, 0.1)
    pol.answered(A, SVC, 502, None, 0.001)
    assert pol.parts(SVC, A, 4, 0, None)["penalty"] == pytest.approx(P.BAN_BASE_S)
    assert pol.penalties["failure"] == 23
    # banned workers are the last resort, not dropped
    assert [r.worker_id for r in pol.order(SVC, recs, {}, seen.get)] == [B, A]


def test_retry_after_is_honoured_and_bounded() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    pol.answered(A, SVC, 503, "3", 0.001)
    assert [r.worker_id for r in pol.order(SVC, recs, {}, {}.get)] == [B]
    clock.t += 2.9
    assert [r.worker_id for r in pol.order(SVC, recs, {}, {}.get)] == [B]
    clock.t += 0.2
    assert len(pol.order(SVC, recs, {}, {}.get)) == 2
    # a 429 with an absurd wait is held for the bound only; nothing left -> held_for
    pol.answered(A, SVC, 429, "999999", 0.001)
    pol.answered(B, SVC, 503, "2", 0.001)
    assert pol.order(SVC, recs, {}, {}.get) == []
    assert pol.held_for(recs) == pytest.approx(2.0)
    assert pol.parts(SVC, A, 4, 0, None)["retry_after"] == pytest.approx(P.RETRY_AFTER_MAX_S)
    # holding is not a failure: no latency sample, no ban
    assert pol.penalties["failure"] == 0 and pol.parts(SVC, A, 4, 0, None)["penalty"] == 0


def test_retry_after_values() -> None:
    now = 1_700_000_000.0
    assert retry_after_s("5", now) == 5.0
    assert retry_after_s(" 0 ", now) == 0.0
    assert retry_after_s("99999999999", now) == P.RETRY_AFTER_MAX_S
    assert retry_after_s("Tue, 14 Nov 2023 22:13:30 GMT", now) == pytest.approx(10.0)
    assert retry_after_s("Tue, 14 Nov 2000 22:13:30 GMT", now) == 0.0
    for bad in (None, "", "-1", "soon", "1.5"):
        assert retry_after_s(bad, now) is None


def test_busy_answer_makes_a_worker_hot_for_a_second() -> None:
    pol, clock = make()
    recs = [Rec(A), Rec(B)]
    seen = loads(clock, a=Load(0, 0, 4), b=Load(3, 0, 4))
    pol.busy(A)
    assert firsts(pol, recs, seen, n=20) == {B: 20}
    clock.t += P.BUSY_HOLD_S + 0.01
    assert firsts(pol, recs, seen, n=20) == {A: 20}


def test_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_TRACKED", 8)
    pol, _clock = make()
    for i in range(50):
        wid = i.to_bytes(20, "big")
        pol.success(wid, SVC, 0.01)
        pol.failure(wid, SVC)
    assert pol.stats()["tracked_workers"] == 8 and pol.stats()["latency_estimates"] == 8


def test_a_newer_record_keeps_the_slots_an_answer_stated() -> None:
    from types import SimpleNamespace

    from agent.router.freshload import FreshLoads
    fl = FreshLoads()
    fl.header(A, "inflight=1; queue=0; capacity=2", 100.0)
    # the record's capacity is the admission limit (slots + queue), not the slots
    fl.record(SimpleNamespace(worker_id=A, load=3.0, capacity=10.0, issued_at=101.0))
    seen = fl.get(A)
    assert seen is not None and seen.source == "record" and seen.load == Load(3, 0, 2)
    fl.record(SimpleNamespace(worker_id=B, load=3.0, capacity=10.0, issued_at=101.0))
    assert fl.get(B).load == Load(3, 0, 10)
