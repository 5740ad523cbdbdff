"""WorkerSlots: shares, overdue attempts and hanging workers, on an explicit clock."""

from __future__ import annotations

from agent.router.slots import REPORT_EVERY_S, WorkerSlots

W, V = b"w" * 20, b"v" * 20


def test_share_caps_each_worker_on_its_own():
    s = WorkerSlots(share=3)
    for _ in range(3):
        assert s.has_room(W, 0.0)
        s.acquire(W, 4)
    assert not s.has_room(W, 0.0)
    assert s.has_room(V, 0.0)                    # another worker is not affected
    s.release(W)
    assert s.has_room(W, 0.0)
    for _ in range(2):
        s.release(W)
    assert s.inflight == {}


def test_more_overdue_than_capacity_is_suspect_and_reported_once_per_period():
    s = WorkerSlots(share=64, overdue_min_s=5.0, suspect_min=8)
    tokens = []
    for _ in range(8):
        s.acquire(W, 4)
        tokens.append(s.sent(W, 0.0))
    assert s.suspect_at(W) == 8                  # max(capacity + 1, suspect_min)
    assert s.overdue(W, 4.9) == 0 and not s.suspect(W, 4.9)
    assert s.sweep(4.9) == []
    assert s.overdue(W, 5.0) == 8 and s.suspect(W, 5.0)
    assert not s.has_room(W, 5.0)                # new requests skip it
    assert s.sweep(5.0) == [(W, 8)]
    assert s.sweep(6.0) == []                    # not again at once ...
    assert s.sweep(5.0 + REPORT_EVERY_S) == [(W, 8)]   # ... but while it keeps hanging
    assert s.suspects == 2
    s.answered(W, tokens[0], 30.0, headers=False)      # one gave up: 7 < 8
    assert not s.suspect(W, 30.0) and s.has_room(W, 30.0)


def test_a_worker_within_its_capacity_is_never_suspect_however_slow():
    s = WorkerSlots(share=64, overdue_min_s=5.0, suspect_min=8)
    for _ in range(40):
        s.acquire(W, 1000)
        s.sent(W, 0.0)
    assert s.suspect_at(W) == 64                 # capped by the share
    assert s.overdue(W, 100.0) == 40 and not s.suspect(W, 100.0)


def test_usual_time_to_headers_moves_the_overdue_line():
    s = WorkerSlots(overdue_min_s=5.0)
    t = s.sent(W, 0.0)
    s.answered(W, t, 20.0, headers=True)         # this service thinks for 20 s
    assert s.overdue_after(W) == 80.0
    for _ in range(10):
        s.acquire(W, 4)
        s.sent(W, 100.0)
    assert s.overdue(W, 150.0) == 0 and s.overdue(W, 180.0) == 10
    assert s.stats(180.0)["waiting_for_headers"] == 10
