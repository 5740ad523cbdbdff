"""ProviderStorage: one record per worker, newest seq wins, expiry, bounds, fair sampling."""

import random
import time
import tracemalloc

from agent.dht.identity import Identity
from agent.dht.record import ALL_SERVICES, WorkerRecord, service_key
from agent.dht.storage import ProviderStorage

KEY = service_key("ocr")
IDS = [Identity.generate() for _ in range(40)]


def make(ident, *, seq=None, ttl=300, load=0.5, capacity=4, now=None, withdrawn=False,
         services=("ocr",), endpoint="https://x"):
    return WorkerRecord.create(ident, name="w", services=services, endpoint=endpoint,
                               gpu="T4", gpu_memory_gb=16, load=load, capacity=capacity,
                               region="", seq=seq, ttl=ttl, withdrawn=withdrawn, now=now)


def test_newest_seq_wins_and_replay_refused():
    s = ProviderStorage()
    a = IDS[0]
    r1, r2 = make(a, seq=10), make(a, seq=20)
    assert s.put(KEY, r1, sender=("10.0.0.1", 1)) == "stored"
    assert s.put(KEY, r2, sender=("10.0.0.1", 1)) == "stored"
    assert s.put(KEY, r1, sender=("10.0.0.2", 1)) == "stale"  # replay of the older record
    assert s.put(KEY, make(a, seq=20, load=0.0)) == "same"  # equal seq keeps the existing copy
    assert s.get(KEY) == [r2]
    assert s.count() == 1 and s.refused["stale"] == 1


def test_workers_coexist_and_cannot_overwrite_each_other():
    s = ProviderStorage()
    a, b = IDS[0], IDS[1]
    ra, rb = make(a, seq=5), make(b, seq=1)
    assert s.put(KEY, ra) == "stored" and s.put(KEY, rb) == "stored"
    assert {r.worker_id for r in s.get(KEY)} == {a.node_id, b.node_id}
    # b cannot put a record claiming a's worker id: signature/id check fails
    import dataclasses
    forged = dataclasses.replace(make(b, seq=99), worker_id=a.node_id)
    assert s.put(KEY, forged) == "invalid"
    forged2 = dataclasses.replace(make(b, seq=99), worker_id=a.node_id, public_key=a.public_key)
    assert s.put(KEY, forged2) == "invalid"
    assert s.record(KEY, a.node_id) == ra


def test_wrong_key_refused():
    s = ProviderStorage()
    assert s.put(service_key("asr"), make(IDS[0])) == "wrong_key"
    assert s.put(service_key(ALL_SERVICES), make(IDS[0])) == "stored"


def test_expiry_drops_lazily_and_by_cull():
    s = ProviderStorage()
    now = time.time()
    s.put(KEY, make(IDS[0], ttl=5, now=now), now=now)
    s.put(KEY, make(IDS[1], ttl=50, now=now), now=now)
    assert len(s.get(KEY, now=now + 1)) == 2
    assert [r.worker_id for r in s.get(KEY, now=now + 10)] == [IDS[1].node_id]
    assert s.count() == 1
    assert s.cull(now + 100) == 1 and s.count() == 0 and s.keys() == []
    # an expired record is refused outright
    assert s.put(KEY, make(IDS[2], ttl=5, now=now), now=now + 6) == "invalid"


def test_tombstone_hides_worker_and_blocks_replay():
    s = ProviderStorage()
    a = IDS[0]
    live = make(a)
    s.put(KEY, live)
    t = live.tombstone(a)
    assert s.put(KEY, t) == "stored"
    assert s.get(KEY) == []
    assert s.put(KEY, live) == "stale"
    assert s.tombstones(KEY, since=time.time() - 60) == [t.encode()]
    assert s.stats()["tombstones"] == 1


def test_bounds_hold_under_flood():
    s = ProviderStorage(max_per_key=16, max_keys=4, max_per_sender=8, max_total=40)
    recs = [make(i, services=("ocr", "asr", "tts", "llm", "sd")) for i in IDS]
    keys = [service_key(n) for n in ("ocr", "asr", "tts", "llm", "sd")]
    statuses = []
    for n, r in enumerate(recs):
        for k in keys:
            statuses.append(s.put(k, r, sender=("10.0.0.9", 1000 + n % 3)))
            assert s.count() <= 40 and len(s.keys()) <= 4
            assert all(s.count(k2) <= 16 for k2 in s.keys())
            assert all(s.sender_count(("10.0.0.9", 1000 + p)) <= 8 for p in range(3))
    assert "sender_full" in statuses and "too_many_keys" in statuses
    # a trusted sender (the coordinator republishing many workers) is not bounded as one
    # host: each record counts against its own worker's endpoint host
    t = ProviderStorage(max_per_sender=2, trusted={"10.0.0.7"})
    for n, i in enumerate(IDS[:10]):
        assert t.put(KEY, make(i, endpoint=f"https://w{n}.example{n}.org"),
                     sender=("10.0.0.7", 8468)) == "stored"
    # per-key bound: a full key of one-record hosts refuses newcomers, however long-lived
    # (a 3600 s stranger must not displace an honest 300 s record)
    k = ProviderStorage(max_per_key=3)
    now = time.time()
    for n, i in enumerate(IDS[:3]):
        k.put(KEY, make(i, ttl=100 + n, now=now), sender=(f"10.0.{n}.1", 1), now=now)
    assert k.put(KEY, make(IDS[3], ttl=50, now=now), sender=("10.9.0.1", 1), now=now) == "key_full"
    assert k.put(KEY, make(IDS[4], ttl=3600, now=now), sender=("10.9.0.2", 1),
                 now=now) == "key_full"
    assert k.count(KEY) == 3 and all(k.record(KEY, i.node_id) for i in IDS[:3])


def test_per_ip_quota_ignores_source_ports():
    s = ProviderStorage(max_per_sender=5)
    got = [s.put(KEY, make(i), sender=("203.0.113.9", 1000 + n)) for n, i in enumerate(IDS[:20])]
    assert got.count("stored") == 5 and got.count("sender_full") == 15
    assert s.sender_count(("203.0.113.9", 1)) == 5
    # one /24 is bounded too (default 4 x the per-host bound)
    p = ProviderStorage(max_per_sender=2)
    got = [p.put(KEY, make(i), sender=(f"203.0.113.{n}", 1)) for n, i in enumerate(IDS[:20])]
    assert got.count("stored") == 8
    # an honest host elsewhere still stores
    assert p.put(KEY, make(IDS[30]), sender=("198.51.100.1", 1)) == "stored"


def test_a_coordinator_relays_no_more_than_the_workers_own_quotas():
    """Issue 20: two IPs of one /24 registered 512 one-hour records with a coordinator and
    storing nodes kept 503, because they trust their configured seed. What a trusted seed
    relays now counts against the endpoint host of each record: its IP and /24, or its
    name and registrable domain."""
    coord = ("10.0.0.7", 8468)
    s = ProviderStorage(trusted={coord[0]})              # 64 per host, 256 per network
    flood = [Identity.generate() for _ in range(512)]
    got = [s.put(KEY, make(i, ttl=3600, endpoint=f"https://203.0.113.{n % 2 + 1}:8443"),
                 sender=coord) for n, i in enumerate(flood)]
    assert got.count("stored") == 2 * 64 and got.count("sender_full") == 512 - 128
    got = [s.put(KEY, make(i, ttl=3600, endpoint=f"https://203.0.113.{n % 200 + 3}"),
                 sender=coord) for n, i in enumerate(flood[128:])]
    assert got.count("stored") == 256 - 128           # the /24 is full at 256
    got = [s.put(KEY, make(i, endpoint=f"https://w{n}.evil.example"), sender=coord)
           for n, i in enumerate([Identity.generate() for _ in range(300)])]
    assert got.count("stored") == 256                 # names: one registrable domain
    # honest workers elsewhere — quick tunnels each their own owner — are all relayed,
    # and announcing directly from the flooded /24 is refused as before
    honest = [Identity.generate() for _ in range(100)]
    got = [s.put(KEY, make(i, endpoint=f"https://word-{n}-x.trycloudflare.com"), sender=coord)
           for n, i in enumerate(honest)]
    assert got == ["stored"] * 100
    assert s.put(KEY, make(Identity.generate()), sender=("203.0.113.99", 1)) == "sender_full"
    assert s.put(KEY, make(Identity.generate(), endpoint="https://8.8.8.8"),
                 sender=coord) == "stored"
    # a relayed copy and the worker's own announcement count in the same groups
    assert s.sender_count(("203.0.113.1", 5)) == 64
    # records this node stores itself count nowhere
    assert s.put(KEY, make(Identity.generate(), endpoint="https://203.0.113.1"),
                 sender=None) == "stored"


def test_registrable_domain() -> None:
    from agent.dht.quota import registrable_domain

    assert registrable_domain("a.b.example.org") == "example.org"
    assert registrable_domain("example.org") == "example.org"
    assert registrable_domain("gpu.lab.example.co.uk") == "example.co.uk"
    assert registrable_domain("some-words-here.trycloudflare.com") == \
        "some-words-here.trycloudflare.com"
    assert registrable_domain("x.y.trycloudflare.com") == "y.trycloudflare.com"
    assert registrable_domain("localhost") == "localhost"


def test_full_key_evicts_the_flooders_records_first():
    s = ProviderStorage(max_per_key=10, max_per_sender=100)
    now = time.time()
    flood = [Identity.generate() for _ in range(8)]
    for i in flood:        # one host with 8 records, long-lived ones
        assert s.put(KEY, make(i, ttl=3600, now=now), sender=("203.0.113.9", 7), now=now) == "stored"
    honest = IDS[:6]
    for n, i in enumerate(honest):
        assert s.put(KEY, make(i, now=now), sender=(f"198.51.{n}.1", 8468), now=now) == "stored"
    # every honest record is there; the flooder lost what the newcomers needed
    assert all(s.record(KEY, i.node_id) is not None for i in honest)
    assert s.count(KEY) == 10 and s.sender_count(("203.0.113.9", 7)) == 4
    assert s.evicted == 4
    # the flooder cannot push honest records out: it is refused once it is not heavier
    for i in [Identity.generate() for _ in range(5)]:
        s.put(KEY, make(i, ttl=3600, now=now), sender=("203.0.113.9", 8), now=now)
    assert all(s.record(KEY, i.node_id) is not None for i in honest)
    # a second flooding host competes only with the first one
    got = [s.put(KEY, make(i, now=now), sender=("192.0.2.5", 1), now=now)
           for i in [Identity.generate() for _ in range(6)]]
    assert all(s.record(KEY, i.node_id) is not None for i in honest)
    assert "key_full" in got and s.count(KEY) == 10
    # a trusted republisher (coordinator) and local records are never evicted
    t = ProviderStorage(max_per_key=3, trusted={"10.0.0.7"})
    for n, i in enumerate(IDS[:3]):
        t.put(KEY, make(i, endpoint=f"https://w{n}.example{n}.org"), sender=("10.0.0.7", 1))
    assert t.put(KEY, make(IDS[4]), sender=("10.1.1.1", 1)) == "key_full"


def test_memory_flat_under_flood():
    s = ProviderStorage(max_per_key=64, max_per_sender=10_000, max_total=200)
    pool = [make(i, seq=n) for n, i in enumerate(IDS)]
    tracemalloc.start()
    for rnd in range(5):
        for n, i in enumerate(IDS):  # fresh seqs each round: every put is a real update
            s.put(KEY, make(i, seq=1000 * (rnd + 1) + n), sender=("10.0.0.1", n))
        if rnd == 1:
            base, _ = tracemalloc.get_traced_memory()
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.count() == len(IDS) and len(pool) == 40
    assert cur - base < 200_000


def test_fair_sample_best_half_plus_random():
    s = ProviderStorage(rng=random.Random(7))
    ids = [Identity.generate() for _ in range(60)]
    for n, i in enumerate(ids):
        s.put(KEY, make(i, load=float(n), capacity=100))  # utilisation n/100
    seen = set()
    for _ in range(50):
        got = s.get(KEY, limit=20)
        assert len(got) == 20
        # the 10 least loaded always come first
        assert [r.load for r in got[:10]] == [float(n) for n in range(10)]
        seen.update(r.worker_id for r in got)
    assert len(seen) == 60  # everyone appears in some answer
    assert len(s.get(KEY, limit=100)) == 60


def test_kademlia_istorage_surface_inert():
    s = ProviderStorage()
    import pytest
    with pytest.raises(TypeError):
        s[b"k" * 20] = b"plain value"
    assert list(s) == [] and s.iter_older_than(0) == []
    assert s.get(b"k" * 20, default="d") == "d"


def test_pages_partition_the_rest():
    s = ProviderStorage()
    ids = [Identity.generate() for _ in range(47)]
    for n, i in enumerate(ids):
        s.put(KEY, make(i, load=float(n), capacity=100))
    total, pages = s.pages(KEY, limit=20)
    assert (total, pages) == (47, 4)  # 10 best + 37 others in pages of 10
    seen = []
    for p in range(pages):
        got = s.get_encoded(KEY, limit=20, page=p)
        assert got[:10] == s.get_encoded(KEY, limit=20, page=p + 4)[:10]  # best 10 each time
        seen.extend(got[10:])
    assert len(seen) == 37 and len(set(seen)) == 37  # every other record exactly once
    assert s.get_encoded(KEY, limit=20, page=5) == s.get_encoded(KEY, limit=20, page=1)
    small = ProviderStorage()
    small.put(KEY, make(ids[0]))
    assert small.pages(KEY) == (1, 0)


def test_on_stored_sees_new_and_replacing_records_only():
    s = ProviderStorage()
    seen: list[WorkerRecord] = []
    s.on_stored = seen.append
    a = IDS[0]
    r1, r2 = make(a, seq=10), make(a, seq=20, withdrawn=True)
    s.put(KEY, r1)
    s.put(KEY, r2)                    # a withdrawal replaces the record: observed
    s.put(KEY, r1)                    # stale replay: refused, not observed
    s.put(KEY, make(a, seq=20))       # equal seq: kept the existing copy, not observed
    assert seen == [r1, r2]

    def broken(_record: WorkerRecord) -> None:
        raise RuntimeError("observer bug")

    s.on_stored = broken              # a failing observer never breaks storing
    assert s.put(KEY, make(IDS[1], seq=5)) == "stored"


def test_index_counts_leave_out_stale_records_by_their_own_refresh():
    """A worker killed without a goodbye stops counting in the service index (what
    ``/api/services`` shows) when lookups stop offering it — two of *its own* refreshes —
    not at its TTL (it was counted for 300 s while lookups had dropped it after 20 s)."""
    from agent.dht.keys import index_key, index_shard
    s = ProviderStorage()
    now = time.time()
    fast, slow = IDS[0], IDS[1]
    for ident, refresh in ((fast, 10.0), (slow, 60.0)):
        rec = WorkerRecord.create(ident, name="w", services=("ocr",), endpoint="https://x",
                                  gpu="T4", gpu_memory_gb=16, load=0, capacity=4, region="",
                                  ttl=300, refresh=refresh, now=now)
        key = index_key(index_shard(ident.node_id))
        assert s.put(key, rec, now=now) == "stored"
    keys = {index_key(index_shard(i.node_id)) for i in (fast, slow)}

    def total(at: float) -> int:
        return sum(s.service_counts(k, at).get("ocr", 0) for k in keys)

    assert total(now + 5) == 2
    assert total(now + 30) == 1          # 30 s > 2 x 10 s: fast is stale; slow (2 x 60) not
    assert total(now + 130) == 0
    assert s.count() == 2                # the records themselves stay until their TTL


def test_full_key_of_honest_hosts_is_not_rescanned_until_it_changes():
    s = ProviderStorage(max_per_key=4, max_per_sender=100)
    for n, i in enumerate(IDS[:4]):
        assert s.put(KEY, make(i), sender=(f"198.51.{n}.1", 1)) == "stored"
    assert s.put(KEY, make(IDS[4]), sender=("203.0.113.9", 1)) == "key_full"
    assert KEY in s._no_flooder                       # remembered: no host holds two
    assert s.put(KEY, make(IDS[5]), sender=("203.0.113.9", 1)) == "key_full"
    # a change to the key forgets it: a host that now holds two can be evicted from
    s.put(KEY, make(IDS[0], seq=10**15), sender=("198.51.1.1", 1))   # moves to host 1
    assert KEY not in s._no_flooder
    assert s.put(KEY, make(IDS[6]), sender=("203.0.113.7", 1)) == "stored"
    assert s.evicted == 1 and s.sender_count(("198.51.1.1", 1)) == 1


def test_range_reads_page_every_record_in_worker_id_order_with_tombstones():
    """``range_encoded`` is what ``list_providers`` answers: every record of an id range,
    in id order, cut at the byte budget with the id to continue from."""
    s = ProviderStorage()
    recs = {i.node_id: make(i) for i in IDS}
    for r in recs.values():
        assert s.put(KEY, r) == "stored"
    gone = IDS[3]
    tomb = recs[gone.node_id].tombstone(gone)
    assert s.put(KEY, tomb) == "stored"
    seen: list[bytes] = []
    cursor, calls = b"", 0
    while cursor is not None:
        chunk, cursor = s.range_encoded(KEY, cursor, b"", budget=2000)
        calls += 1
        assert sum(len(b) + 3 for b in chunk) <= 2000 and chunk
        seen.extend(chunk)
    decoded = [WorkerRecord.decode(b) for b in seen]
    ids = [r.worker_id for r in decoded]
    assert ids == sorted(recs) and calls == -(-len(recs) // (2000 // (len(seen[0]) + 3)))
    assert [r for r in decoded if r.withdrawn] == [tomb]   # the withdrawal rides along
    # a bounded range: only ids in [start, end)
    lo, hi = sorted(recs)[10], sorted(recs)[20]
    part, nxt = s.range_encoded(KEY, lo, hi, budget=8000)
    assert nxt is None and [WorkerRecord.decode(b).worker_id for b in part] == sorted(recs)[10:20]
    assert s.range_encoded(service_key("none"), b"", b"", budget=8000) == ([], None)


def test_sketch_counts_live_workers_per_id_bucket_and_follows_changes():
    s = ProviderStorage()
    now = time.time()
    for i in IDS[:20]:
        s.put(KEY, make(i, ttl=300, now=now))
    sk = s.sketch(KEY, now)
    assert len(sk) == 16 and sum(c for c, _x in sk) == 20
    b = IDS[0].node_id[0] >> 4
    assert sk[b][0] >= 1
    # a withdrawal and an expiry change it; a plain refresh (new seq) does not
    before = [list(p) for p in sk]
    s.put(KEY, make(IDS[1], ttl=300, now=now + 1))
    assert s.sketch(KEY, now + 1) == before
    s.put(KEY, make(IDS[0], ttl=300, now=now + 2).tombstone(IDS[0], now=now + 2))
    after = s.sketch(KEY, now + 2)
    assert after[b][0] == before[b][0] - 1 and sum(c for c, _x in after) == 19
    s.put(KEY, make(IDS[25], ttl=5, now=now))
    assert sum(c for c, _x in s.sketch(KEY, now + 3)) == 20
    assert sum(c for c, _x in s.sketch(KEY, now + 10)) == 19   # expired: gone


def test_service_counts_of_an_index_shard():
    s = ProviderStorage()
    shards = set()
    for i, ident in enumerate(IDS[:12]):
        r = make(ident, services=("ocr", "llm") if i % 3 == 0 else ("asr",))
        assert s.put(r.keys()[-1], r) == "stored"      # each under its own index shard
        shards.add(r.keys()[-1])
    total: dict[str, int] = {}
    for key in s.keys():
        for svc, n in s.service_counts(key).items():
            total[svc] = total.get(svc, 0) + n
    assert total == {"ocr": 4, "llm": 4, "asr": 8}
    assert set(s.keys()) == shards
