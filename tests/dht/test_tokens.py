"""Write tokens (per IP, rotating secret), the anti-amplification budget, the token cache."""

from __future__ import annotations

from agent.dht.tokens import TOKEN_LEN, AddressBudget, TokenCache, WriteTokens


def test_token_bound_to_ip_and_rotates():
    t = WriteTokens(rotate=300, now=0)
    tok = t.issue("203.0.113.9", now=0)
    assert len(tok) == TOKEN_LEN
    assert t.check("203.0.113.9", tok, now=1)
    assert t.check("::ffff:203.0.113.9", tok, now=1)        # v4-mapped is the same host
    assert not t.check("203.0.113.10", tok, now=1)           # another address: refused
    assert not t.check("203.0.113.9", b"x" * TOKEN_LEN, now=1)
    assert not t.check("203.0.113.9", "not bytes", now=1)
    assert t.check("203.0.113.9", tok, now=400)              # previous secret still good
    assert not t.check("203.0.113.9", tok, now=700)          # two rotations: expired
    fresh = t.issue("203.0.113.9", now=700)
    assert fresh != tok and t.check("203.0.113.9", fresh, now=701)
    # a long pause invalidates both old secrets at once
    assert not t.check("203.0.113.9", fresh, now=5000)
    # another node's secret makes other tokens
    assert not WriteTokens(now=700).check("203.0.113.9", fresh, now=701)


def test_amplification_budget_and_proof():
    g = AddressBudget(factor=3.0)
    a = ("198.51.100.7", 4000)
    assert not g.may_send(a, 10)            # never heard from: nothing
    g.received(a, 60)
    assert g.may_send(a, 100) and g.may_send(a, 80)
    assert not g.may_send(a, 1)             # 180 = 3 x 60 used up
    g.received(a, 60)
    assert g.may_send(a, 180) and not g.may_send(a, 1)
    assert not g.is_proven(a)
    g.prove(a, now=0)
    assert g.is_proven(a, now=1) and not g.is_proven(a, now=10_000)
    assert not g.is_proven(("198.51.100.7", 4001), now=1)   # per ip:port
    small = AddressBudget(max_entries=4)
    for i in range(100):
        small.received((f"10.0.0.{i}", 1), 50)
        small.prove((f"10.1.0.{i}", 1))
    assert small.stats() == {"proven": 4, "unproven": 4}


def test_token_cache_ages_out():
    c = TokenCache(max_age=100, max_entries=2)
    c.put(("a", 1), b"t" * 8, now=0)
    assert c.get(("a", 1), now=50) == b"t" * 8
    assert c.get(("a", 1), now=150) is None
    for i in range(5):
        c.put(("b", i), b"u" * 8, now=0)
    assert len(c) == 2
