"""The retry budget: retries stay within 20 % of routed requests plus a small reserve."""

from __future__ import annotations

from agent.router.budget import RetryBudget


def test_retries_bounded_by_ratio_plus_reserve() -> None:
    b = RetryBudget(ratio=0.2, reserve=10)
    retries = 0
    for _ in range(10_000):
        b.deposit()
        while b.withdraw():          # a worst case: every request wants to retry
            retries += 1
    assert retries <= 0.2 * 10_000 + 10
    assert retries >= 0.2 * 10_000 - 1
    assert b.refused > 0


def test_quiet_time_cannot_bank_a_storm() -> None:
    b = RetryBudget(ratio=0.2, reserve=10)
    for _ in range(100_000):
        b.deposit()
    spent = 0
    while b.withdraw():
        spent += 1
    assert spent == 20                 # the cap (2 x reserve), not 20 000
