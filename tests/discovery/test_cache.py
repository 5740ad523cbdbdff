"""The lookup cache: no DHT query within cache_ttl, single-flight, early invalidation."""

from __future__ import annotations

import asyncio

from agent.dht.identity import Identity
from agent.discovery.select import Query
from tests.discovery._support import Clock, make_discovery, make_record
from tests.util import wait_for_async


async def test_repeated_lookups_within_ttl_cost_no_dht_query():
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock, cache_ttl=20)
    for i in range(3):
        dht.add(make_record(name=f"w{i}", now=clock.t))
    first = await comp.lookup("ocr")
    assert first.source == "dht" and len(first.workers) == 3
    for _ in range(50):
        clock.advance(0.3)
        again = await comp.lookup("ocr")
        assert again.source == "cache" and len(again.workers) == 3
    assert dht.calls == ["ocr"] and comp.counts["dht_queries"] == 1
    clock.advance(6)        # 21 s after the first lookup: past cache_ttl
    assert (await comp.lookup("ocr")).source == "dht"
    assert dht.calls == ["ocr", "ocr"]
    st = comp.stats()["discovery"]
    assert st["by_source"] == {"cache": 50, "dht": 2, "coordinator": 0, "stale": 0}
    assert st["cache_hit_rate"] == round(50 / 52, 4) and st["dht_hit_rate"] == 1.0
    assert st["lookup_p50_ms"] is not None and st["lookup_p99_ms"] >= st["lookup_p50_ms"]


async def test_concurrent_lookups_share_one_dht_query():
    _agent, comp, dht = make_discovery()
    dht.delay = 0.1
    dht.add(make_record())
    results = await asyncio.gather(*(comp.lookup("ocr") for _ in range(25)))
    assert len(dht.calls) == 1
    assert all(r.source == "dht" and len(r.workers) == 1 for r in results)
    assert comp.counts["single_flight_joined"] == 24


async def test_cancelled_caller_does_not_cancel_the_shared_query():
    _agent, comp, dht = make_discovery()
    dht.delay = 0.1
    dht.add(make_record())
    a = asyncio.ensure_future(comp.lookup("ocr"))
    b = asyncio.ensure_future(comp.lookup("ocr"))
    await wait_for_async(lambda: dht.calls == ["ocr"], what="the shared DHT query started")
    a.cancel()
    assert len((await b).workers) == 1 and len(dht.calls) == 1


async def test_worker_reported_failed_is_dropped_from_the_cached_answer_then_retried():
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock, cache_ttl=60)
    bad, good = Identity.generate(), Identity.generate()
    dht.add(make_record(bad, name="bad", load=0.0, now=clock.t))
    dht.add(make_record(good, name="good", load=3.0, now=clock.t))
    assert {w["name"] for w in (await comp.lookup("ocr")).workers} == {"bad", "good"}
    out = comp.report("ocr", bad.node_id, False, None)
    assert out["healthy"] is False and out["retry_in_s"] == 15.0
    after = await comp.lookup("ocr")
    assert [w["name"] for w in after.workers] == ["good"]
    # the failure invalidated the entry: one new DHT query (a newer record may exist)
    assert len(dht.calls) == 2
    again = await comp.lookup("ocr")
    assert again.source == "cache" and [w["name"] for w in again.workers] == ["good"]
    # retried after the back-off; a second failure doubles it
    clock.advance(15.1)
    assert {w["name"] for w in (await comp.lookup("ocr", fresh=True)).workers} == {"bad", "good"}
    assert comp.report("ocr", bad.node_id, False, None)["retry_in_s"] == 30.0
    assert comp.report("ocr", bad.node_id, True, 12.0)["healthy"] is True


async def test_newer_record_seen_elsewhere_invalidates_the_entry():
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock)
    ident = Identity.generate()
    dht.add(make_record(ident, services=("ocr", "llm"), load=3.0, seq=5, now=clock.t))
    assert (await comp.lookup("ocr")).workers[0]["load"] == 3.0
    dht.add(make_record(ident, services=("ocr", "llm"), load=0.0, seq=6, now=clock.t))
    assert (await comp.lookup("ocr")).source == "cache"      # not seen yet
    await comp.lookup("llm")                                 # sees seq 6
    res = await comp.lookup("ocr")
    assert res.source == "dht" and res.workers[0]["load"] == 0.0


async def test_entry_refreshes_before_its_records_turn_stale():
    clock = Clock()
    # the caller republishes every 300 s, the worker every 10 s: the record's own
    # ``refresh`` decides when it turns stale, not the caller's configuration
    _agent, comp, dht = make_discovery(clock=clock, cache_ttl=60, republish=300)
    ident = Identity.generate()
    dht.add(make_record(ident, now=clock.t - 15, refresh=10))  # stale 5 s from now
    assert (await comp.lookup("ocr")).source == "dht"
    clock.advance(4)
    assert (await comp.lookup("ocr")).source == "cache"
    dht.add(make_record(ident, now=clock.t, refresh=10))        # the worker's refresh
    clock.advance(2)
    res = await comp.lookup("ocr")
    assert res.source == "dht" and len(res.workers) == 1 and res.workers[0]["age_s"] == 2.0


async def test_empty_answers_are_cached_briefly():
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock, cache_ttl=60)
    assert (await comp.lookup("ocr")).workers == []
    assert (await comp.lookup("ocr")).source == "cache"
    dht.add(make_record(now=clock.t))
    clock.advance(5.1)
    assert len((await comp.lookup("ocr")).workers) == 1


async def test_zero_ttl_disables_the_cache_and_limit_is_capped():
    _agent, comp, dht = make_discovery(cache_ttl=0, max_results=2)
    for i in range(4):
        dht.add(make_record(name=f"w{i}"))
    for _ in range(3):
        res = await comp.lookup("ocr", Query(limit=10))
        assert res.source == "dht" and len(res.workers) == 2
    assert len(dht.calls) == 3


async def test_service_list_counts_live_workers():
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock)
    dht.add(make_record(services=("ocr", "llm"), now=clock.t))
    dht.add(make_record(services=("ocr",), now=clock.t))
    dht.add(make_record(services=("ocr",), now=clock.t, withdrawn=True))
    dht.add(make_record(services=("tts",), now=clock.t - 100))     # stale
    out = await comp.services()
    assert out["services"] == [{"name": "llm", "workers": 1}, {"name": "ocr", "workers": 2}]
    assert dht.calls == ["*"]


async def test_rendered_ranking_is_reused_only_briefly_and_body_matches():
    import json

    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock)
    ident = Identity.generate()
    dht.add(make_record(ident, now=clock.t))
    await comp.lookup("ocr")
    clock.advance(0.05)
    res = await comp.lookup("ocr")
    assert res.workers[0]["age_s"] == 0.0            # reused: at most 100 ms old
    assert json.loads(res.body()) == res.to_json()
    clock.advance(0.3)
    res = await comp.lookup("ocr")
    assert res.workers[0]["age_s"] == 0.3 and json.loads(res.body()) == res.to_json()
    comp.report("ocr", ident.node_id, True, 20.0)     # the tracker moved: re-ranked at once
    assert (await comp.lookup("ocr")).workers[0]["latency_ms"] == 20.0


async def test_reload_applies_ttl_and_gpu_scores():
    import dataclasses

    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock, cache_ttl=60)
    dht.add(make_record(name="t4", gpu="T4", now=clock.t))
    dht.add(make_record(name="h100", gpu="H100", now=clock.t))
    plain = Query(limit=2)
    first = await comp.lookup("ocr", plain)
    assert max(first.workers, key=lambda w: w["score"])["name"] == "h100"
    old = agent.config
    new = dataclasses.replace(old, discovery=dataclasses.replace(
        old.discovery, cache_ttl=1, gpu_scores={**old.discovery.gpu_scores, "T4": 1.0,
                                                "H100": 0.0}))
    agent.config = new
    await comp.reload(old, new)
    res = await comp.lookup("ocr", plain)
    assert res.source == "dht"                         # scores changed: cache dropped
    assert max(res.workers, key=lambda w: w["score"])["name"] == "t4"
    clock.advance(1.1)
    assert (await comp.lookup("ocr", plain)).source == "dht"   # new ttl of 1 s


async def test_plain_refresh_keeps_the_entry_withdrawal_event_drops_it():
    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock)
    comp.prober.top = 0                 # the records' endpoints are made up: no probes
    await comp.start()
    try:
        a, b = Identity.generate(), Identity.generate()
        ra = make_record(a, name="a", services=("ocr", "llm"), seq=5, now=clock.t)
        dht.add(ra)
        dht.add(make_record(b, name="b", services=("ocr", "llm"), seq=5, now=clock.t))
        assert len((await comp.lookup("ocr")).workers) == 2
        # the same content with a newer seq (a periodic refresh): not a reason to re-query
        dht.add(make_record(a, name="a", services=("ocr", "llm"), seq=6, now=clock.t))
        await comp.lookup("llm")
        assert (await comp.lookup("ocr")).source == "cache"
        # the local DHT node stores a's withdrawal: the bus event invalidates the entry
        tomb = ra.tombstone(a, now=clock.t)
        dht.add(tomb)
        agent.emit("record", tomb)
        res = await comp.lookup("ocr")
        assert res.source == "dht" and [w["name"] for w in res.workers] == ["b"]
        assert comp.counts["record_invalidations"] == 2      # its "ocr" and "llm" entries
    finally:
        await comp.stop()


async def test_staleness_follows_each_records_own_refresh():
    """A worker configured with a longer interval than the caller is not hidden: a
    record 50 s old is fresh when its worker republishes every 60 s, stale when every
    20 s, whatever the caller's own republish_interval (10 s here)."""
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock, cache_ttl=60, republish=10)
    slow, fast = Identity.generate(), Identity.generate()
    dht.add(make_record(slow, name="slow", now=clock.t - 50, refresh=60))
    dht.add(make_record(fast, name="fast", now=clock.t - 50, refresh=20))
    res = await comp.lookup("ocr")
    assert [w["name"] for w in res.workers] == ["slow"]


async def test_worker_back_after_a_restart_shows_at_once_not_after_the_negative_ttl():
    """An upgrade restarts a worker: its withdrawal empties the cached answer, and the
    record it announces after the restart (stored by the local DHT node: the "record"
    event) must end that empty answer at once, not NEGATIVE_TTL_S later."""
    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock, cache_ttl=60)
    comp.prober.top = 0                 # the records' endpoints are made up: no probes
    await comp.start()
    try:
        ident = Identity.generate()
        live = make_record(ident, name="w", seq=5, now=clock.t)
        dht.add(live)
        assert len((await comp.lookup("ocr")).workers) == 1
        tomb = live.tombstone(ident, now=clock.t)
        dht.add(tomb)
        agent.emit("record", tomb)
        assert (await comp.lookup("ocr")).workers == []
        assert (await comp.lookup("ocr")).source == "cache"      # the empty answer, cached
        clock.advance(0.5)
        back = make_record(ident, name="w", seq=tomb.seq + 1, now=clock.t)
        dht.add(back)
        agent.emit("record", back)
        res = await comp.lookup("ocr")
        assert res.source == "dht" and [w["name"] for w in res.workers] == ["w"]
        # A record issued just before the entry was fetched but stored here after it (it
        # was in transit while the query ran) is news too.
        clock.advance(0.5)
        assert (await comp.lookup("ocr")).source == "cache"
        late = make_record(name="late", now=clock.t - 0.5)   # issued before that fetch
        clock.advance(0.1)
        assert (await comp.lookup("ocr")).source == "cache"
        dht.add(late)
        agent.emit("record", late)
        res = await comp.lookup("ocr")
        assert res.source == "dht" and sorted(w["name"] for w in res.workers) == ["late", "w"]
        # An old record of a worker the entry lacks (issued long before the entry was
        # fetched, e.g. a stale copy another lookup came across) is no reason to re-query.
        other = make_record(name="old", now=clock.t - 30)
        agent.emit("record", other)
        assert (await comp.lookup("ocr")).source == "cache"
        # Nor is a live record of a worker serving another service.
        agent.emit("record", make_record(name="llm-only", services=("llm",), now=clock.t + 1))
        assert (await comp.lookup("ocr")).source == "cache"
    finally:
        await comp.stop()


async def test_service_list_leaves_out_looked_up_names_nobody_serves():
    """A lookup of a name nobody serves (a typo, a probe) caches an empty answer; the
    service list must not show it as a service "with 0 workers" (it did, for cache_ttl)."""
    clock = Clock()
    _agent, comp, dht = make_discovery(clock=clock)
    dht.add(make_record(services=("ocr",), now=clock.t))
    assert (await comp.lookup("nosuch")).workers == []
    assert len((await comp.lookup("ocr")).workers) == 1
    out = await comp.services()
    assert out["services"] == [{"name": "ocr", "workers": 1}]


async def test_record_stored_while_the_query_runs_is_not_lost_in_a_cached_answer():
    """The race behind a restarted worker staying invisible: the lookup's DHT query is in
    flight (it will answer "nobody") when the worker's new record is stored locally. The
    answer must not be served from the cache as if it were current."""
    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock, cache_ttl=60)
    comp.prober.top = 0
    await comp.start()
    try:
        dht.delay = 0.2
        started = len(dht.calls)
        lookup = asyncio.ensure_future(comp.lookup("ocr"))
        await wait_for_async(lambda: len(dht.calls) == started + 1,  # it will find nothing
                             what="the DHT query started")
        rec = make_record(name="w", now=clock.t)
        agent.emit("record", rec)                   # ... while the record is stored here
        assert (await lookup).workers == []
        dht.add(rec)
        dht.delay = 0.0
        res = await comp.lookup("ocr")
        assert res.source == "dht" and [w["name"] for w in res.workers] == ["w"]
        assert (await comp.lookup("ocr")).source == "cache"     # and cached from then on
        # A record for another service, during a query, changes nothing.
        dht.delay = 0.2
        comp.cache.invalidate("ocr")                # (e.g. a worker reported failed)
        started = len(dht.calls)
        lookup = asyncio.ensure_future(comp.lookup("ocr"))
        await wait_for_async(lambda: len(dht.calls) == started + 1,
                             what="the second DHT query started")
        agent.emit("record", make_record(name="other-service", services=("llm",), now=clock.t))
        assert [w["name"] for w in (await lookup).workers] == ["w"]
        assert (await comp.lookup("ocr")).source == "cache"
    finally:
        await comp.stop()
