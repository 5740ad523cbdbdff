"""Latency EWMA, failure back-off, bounded memory, and real HTTP probes (ownership proofs)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from agent.dht.identity import Identity
from agent.discovery.endpoints import Allowance, GuardedConnector
from agent.discovery.latency import LatencyTracker, Prober
from agent.proof import PROOF_PATH, make_proof, parse_nonce

W1, W2 = b"\x01" * 20, b"\x02" * 20


def test_ewma_and_reset_on_success():
    t = LatencyTracker(alpha=0.5)
    assert t.latency_ms(W1) == -1.0
    t.record_success(W1, 100.0)
    t.record_success(W1, 50.0)
    assert t.latency_ms(W1) == 75.0
    t.record_success(W1, None)                     # ok without a timing: no change
    assert t.latency_ms(W1) == 75.0 and t.get(W1).samples == 2


def test_failure_demotes_at_once_and_backs_off_doubling_to_a_cap():
    t = LatencyTracker(base_backoff_s=15, max_backoff_s=60)
    now = 1000.0
    v = t.version
    assert t.record_failure(W1, now) is True
    assert t.version > v and t.is_banned(W1, now) and W1 in t.current_bans(now)
    assert t.record_failure(W1, now) is False      # already banned: no new invalidation
    assert t.get(W1).banned_until == now + 30
    t.record_failure(W1, now)
    t.record_failure(W1, now)
    assert t.get(W1).banned_until == now + 60      # capped
    assert t.current_bans(now + 61) == {}           # back-off over: eligible again
    t.record_failure(W1, now + 61)
    assert t.get(W1).banned_until == now + 61 + 60  # consecutive failures still count
    t.record_success(W1, 10.0)
    assert not t.is_banned(W1, now + 62) and t.get(W1).failures == 0
    t.record_failure(W1, now + 70)
    assert t.get(W1).banned_until == now + 85       # back to 15 s after a success


def test_thousands_of_failures_keep_the_capped_backoff():
    """Issue 20: the 1,025th failure computed 2.0 ** 1024 and raised OverflowError, so
    every routed request to that worker became a 500."""
    t = LatencyTracker(base_backoff_s=15, max_backoff_s=240)
    now = 1000.0
    for _ in range(1100):
        t.record_failure(W1, now)
    assert t.get(W1).failures == 1100
    assert t.is_banned(W1, now + 239) and not t.is_banned(W1, now + 241)


def test_memory_is_bounded():
    t = LatencyTracker(max_workers=100)
    for i in range(10_000):
        wid = i.to_bytes(20, "big")
        t.record_success(wid, 1.0) if i % 2 else t.record_failure(wid, 0.0)
    assert len(t) == 100 and len(t.current_bans(0.0)) <= 100
    assert t.latency_ms((9999).to_bytes(20, "big")) == 1.0
    assert t.latency_ms((0).to_bytes(20, "big")) == -1.0


class Endpoints:
    """Real HTTP servers standing for workers' gateways, each serving the ownership proof
    at ``{base}/{kind}/.well-known/rma-agent/proof``: ok, slow, dead (530: a dead tunnel
    origin), nohealth (404: no proof), impostor (proof signed by another key). The slow
    one answers (a valid proof) only when the servers stop: later than any probe waits."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.base = ""
        self.ids = {k: Identity.generate() for k in ("ok", "slow", "dead", "nohealth",
                                                      "impostor")}
        self.stopping = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        self.hits[kind] = self.hits.get(kind, 0) + 1
        if kind == "slow":
            await self.stopping.wait()
        if kind in ("dead", "nohealth"):
            return web.json_response({"kind": kind}, status=530 if kind == "dead" else 404)
        signer = Identity.generate() if kind == "impostor" else self.ids.get(kind)
        if signer is None:
            return web.json_response({"error": "no such worker"}, status=404)
        nonce = parse_nonce(request.query["nonce"])
        return web.json_response(make_proof(signer, nonce, f"{self.base}/{kind}"))

    def cand(self, kind: str) -> tuple[bytes, str, bytes]:
        ident = self.ids[kind]
        return ident.node_id, f"{self.base}/{kind}", ident.public_key

    async def __aenter__(self) -> Endpoints:
        app = web.Application()
        app.router.add_get("/{kind}" + PROOF_PATH, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stopping.set()
        await self.runner.cleanup()


@pytest.fixture
async def session():
    """A caller-side session as the agent makes them: through the endpoint rule, with
    loopback allowed (the test's workers are on 127.0.0.1)."""
    conn = GuardedConnector(lambda: Allowance(private=("127.0.0.1",)))
    async with aiohttp.ClientSession(connector=conn) as s:
        yield s


async def test_probes_feed_latency_and_demote_failures(session):
    async with Endpoints() as ep:
        t = LatencyTracker()
        failed: list[bytes] = []
        p = Prober(t, lambda: session, on_failure=failed.append, timeout_s=0.5, top=6,
                   max_concurrency=5)
        ids = {k: ep.ids[k].node_id for k in ep.ids}
        cands = [ep.cand(k) for k in ("ok", "slow", "dead", "nohealth", "impostor")]
        refused = Identity.generate()
        cands.append((refused.node_id, "http://127.0.0.1:9", refused.public_key))
        assert p.consider(cands) == 5                      # max_concurrency = 5
        async with asyncio.timeout(10):       # the slow one answers only at the end
            await p.drain()
        # the slow one (a valid proof, but only at the end) was given up at 0.5 s: it is
        # banned and counted failed below, and "ok" counts only the fast one
        now = time.time()
        assert 0 <= t.latency_ms(ids["ok"]) < 500 and not t.is_banned(ids["ok"], now)
        assert t.get(ids["ok"]).proof == "ok"
        # down: back-off; no proof (404) or a proof by another key: held out as failed
        for kind in ("slow", "dead", "nohealth", "impostor"):
            assert t.is_banned(ids[kind], now), kind
        assert t.get(ids["nohealth"]).proof == "failed"
        assert t.get(ids["impostor"]).proof == "failed"
        assert t.get(ids["dead"]).proof == ""
        assert set(failed) == {ids["slow"], ids["dead"], ids["nohealth"], ids["impostor"]}
        assert p.counts["ok"] == 1 and p.counts["failed"] == 2
        assert p.counts["proof_failed"] == 2
        # a success report cannot lift a failed proof; only a valid proof does
        t.record_success(ids["impostor"], 5.0)
        assert t.is_banned(ids["impostor"], time.time())
        assert p.consider(cands[5:]) == 1                  # the refused one, now room
        await p.drain()
        assert t.is_banned(refused.node_id, time.time())


async def test_probes_are_rate_limited_and_not_repeated_per_worker(session):
    async with Endpoints() as ep:
        t = LatencyTracker()
        p = Prober(t, lambda: session, rate_per_s=3, max_concurrency=100, top=100,
                   min_interval_s=60)
        cands = [(i.to_bytes(20, "big"), f"{ep.base}/ok", b"k" * 32) for i in range(20)]
        assert p.consider(cands) == 3                      # bucket of 3 tokens
        await p.drain()
        assert p.consider(cands[:3]) == 0                  # each worker once per interval
        assert ep.hits["ok"] == 3
        assert p.consider([(b"\x07" * 20, "ftp://nope", b"k" * 32)]) == 0   # only http(s)
