"""DHT keys besides the per-service ones: the sharded service index.

Why: every worker used to announce under the single key ``ALL_SERVICES`` ("*"), so the
~20 nodes closest to that key took every announce of the network and answered every
``/api/services``; a key holds a bounded number of records, so at a few thousand workers
the list was a sample. Now a worker announces under one of ``INDEX_SHARDS`` index keys,
chosen by its worker id, so the index load is spread over ``INDEX_SHARDS`` x k nodes and
each shard holds about W / ``INDEX_SHARDS`` records. A shard's storing nodes answer
``find_providers`` on it with the service names and live counts they hold (not the
records), so listing every service costs ``INDEX_SHARDS`` small lookups whatever the
number of workers.

``INDEX_SHARDS`` is part of the protocol: every agent must derive the same keys.
"""

from __future__ import annotations

import hashlib

INDEX_SHARDS = 32


def index_key(shard: int) -> bytes:
    """The 20-byte DHT key of service-index shard ``shard`` (0 <= shard < INDEX_SHARDS)."""
    if not 0 <= shard < INDEX_SHARDS:
        raise ValueError(f"index shard must be in [0, {INDEX_SHARDS}), got {shard!r}")
    return hashlib.sha1(b"rma-index:%d" % shard).digest()


def index_shard(worker_id: bytes) -> int:
    """The index shard a worker announces under (uniform: worker ids are hashes)."""
    return int.from_bytes(hashlib.sha1(b"rma-index-shard:" + worker_id).digest()[:4],
                          "big") % INDEX_SHARDS


INDEX_KEYS: frozenset[bytes] = frozenset(index_key(i) for i in range(INDEX_SHARDS))
