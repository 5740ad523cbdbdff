"""Service-index shard keys: every worker in exactly one shard, spread evenly."""

from __future__ import annotations

from collections import Counter

import pytest

from agent.dht.identity import Identity
from agent.dht.keys import INDEX_KEYS, INDEX_SHARDS, index_key, index_shard
from agent.dht.record import ALL_SERVICES, WorkerRecord, service_key


def test_shards_are_distinct_and_spread_workers_evenly():
    assert len(INDEX_KEYS) == INDEX_SHARDS
    assert service_key(ALL_SERVICES) not in INDEX_KEYS
    counts = Counter(index_shard(Identity.generate().node_id) for _ in range(3200))
    assert set(counts) == set(range(INDEX_SHARDS))
    assert max(counts.values()) < 2.0 * 3200 / INDEX_SHARDS   # no hot shard
    with pytest.raises(ValueError):
        index_key(INDEX_SHARDS)


def test_a_record_is_announced_under_its_services_and_its_one_shard_not_star():
    ident = Identity.generate()
    r = WorkerRecord.create(ident, name="w", services=("ocr", "llm"), endpoint="https://x",
                            gpu="T4", gpu_memory_gb=16, load=0, capacity=1, region="", ttl=60)
    shard = index_key(index_shard(ident.node_id))
    assert r.keys() == [service_key("ocr"), service_key("llm"), shard]
    assert r.serves(shard) and r.serves(service_key(ALL_SERVICES))  # legacy key accepted
    other = next(k for k in INDEX_KEYS if k != shard)
    assert not r.serves(other)
