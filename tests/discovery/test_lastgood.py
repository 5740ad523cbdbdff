"""The last-known-good copy on disk: a restarted caller cut off from the DHT is not blind."""

from __future__ import annotations

from agent.dht.identity import Identity
from agent.discovery.lastgood import FILE_NAME, LastGood
from tests.discovery._support import Clock, make_discovery, make_record


async def test_restarted_caller_answers_from_disk_marked_stale_with_age():
    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock, cache_ttl=5)
    workers = [Identity.generate() for _ in range(3)]
    for i, w in enumerate(workers):
        dht.add(make_record(w, name=f"w{i}", now=clock.t, ttl=60))
    first = await comp.lookup("ocr")
    assert first.source == "dht" and len(first.workers) == 3
    state_dir = agent.config.agent.state_dir
    assert (state_dir / FILE_NAME).is_file()

    # "restart": a new component on the same state_dir, the DHT now failing, no
    # coordinators, and the records' expiry long past
    clock.advance(600)
    _agent2, comp2, dht2 = make_discovery(clock=clock, cache_ttl=5, state_dir=state_dir)
    dht2.fail = True
    res = await comp2.lookup("ocr")
    assert res.source == "stale"
    assert {w["name"] for w in res.workers} == {"w0", "w1", "w2"}
    assert 599 <= res.age_s <= 601
    body = res.to_json()
    assert body["source"] == "stale" and body["age_s"] == res.age_s
    assert comp2.stats()["discovery"]["by_source"]["stale"] == 1
    # once the DHT answers again, the fresh answer wins
    dht2.fail = False
    dht2.add(make_record(workers[0], name="w0", now=clock.t, ttl=60))
    res = await comp2.lookup("ocr")
    assert res.source == "dht" and [w["name"] for w in res.workers] == ["w0"]


def test_tampered_or_damaged_copy_yields_nothing(tmp_path):
    rec = make_record(name="good", ttl=60)
    lg = LastGood(tmp_path, min_interval_s=0)
    assert lg.save("ocr", [rec])
    raw = (tmp_path / FILE_NAME).read_bytes()
    i = raw.index(b"good")
    (tmp_path / FILE_NAME).write_bytes(raw[:i] + b"evil" + raw[i + 4:])
    assert LastGood(tmp_path).load("ocr") is None          # signature no longer matches
    (tmp_path / FILE_NAME).write_bytes(b"\xc1 not msgpack")
    damaged = LastGood(tmp_path)
    assert damaged.load("ocr") is None and damaged.errors == 1


def test_saves_are_debounced_bounded_and_never_create_the_state_dir(tmp_path):
    lg = LastGood(tmp_path, min_interval_s=30)
    rec = make_record(name="a", ttl=60)
    assert lg.save("ocr", [rec], now=rec.issued_at)
    assert not lg.save("ocr", [rec], now=rec.issued_at + 10)   # too soon
    assert lg.save("ocr", [rec], now=rec.issued_at + 31)
    assert lg.writes == 2
    tomb = make_record(name="gone", ttl=60, withdrawn=True)
    assert not lg.save("asr", [tomb])                          # nothing live to keep
    missing = LastGood(tmp_path / "nope")
    assert missing.save("ocr", [rec]) and not (tmp_path / "nope").exists()
    assert missing.load("ocr")[0][0].name == "a"               # kept in memory still


async def test_the_copy_on_disk_is_held_to_todays_admission_and_endpoint_rules():
    """A record saved while its endpoint was allowed (or its worker admitted) is not
    offered from disk once that no longer holds: the disk answer skipped the filters
    every other answer passes (``admitted``, the endpoint rule)."""
    clock = Clock()
    agent, comp, dht = make_discovery(clock=clock, cache_ttl=5,
                                      allow_http_hosts=("10.0.0.1",))
    dht.add(make_record(name="lan", endpoint="http://10.0.0.1:9", now=clock.t, ttl=60))
    dht.add(make_record(name="local", now=clock.t, ttl=60))
    first = await comp.lookup("ocr")
    assert {w["name"] for w in first.workers} == {"lan", "local"}
    state_dir = agent.config.agent.state_dir
    # restarted without 10.0.0.1 in discovery.allow_http_hosts, cut off from the DHT
    _agent2, comp2, dht2 = make_discovery(clock=clock, cache_ttl=5, state_dir=state_dir)
    dht2.fail = True
    res = await comp2.lookup("ocr")
    assert res.source == "stale" and [w["name"] for w in res.workers] == ["local"]
