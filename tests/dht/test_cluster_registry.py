"""The coordinator registry: a worker whose DHT is unreachable registers over HTTP.

The worker bootstraps to a dead UDP port (so its DHT stores nowhere) but lists the
coordinator in ``discovery.coordinators``; the coordinator verifies the record and
republishes it into the DHT, where a third agent finds it.
"""

from __future__ import annotations

import base64
import signal
import time

import pytest

from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from tests.cluster import Cluster, wait_until
from tests.util import free_udp_tcp_port

pytestmark = pytest.mark.slow


def test_unreachable_worker_registers_with_coordinator(tmp_path) -> None:
    with Cluster(tmp_path, record_ttl=20, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        peer = cl.worker("peer", [c1.dht_addr], services=["asr"])
        dead_seed = f"{peer.ip}:{free_udp_tcp_port(peer.ip)}"       # nobody listens there
        lone = cl.worker("lone", [dead_seed], services=["ocr", "llm"],
                         coordinators=[c1.url])
        cl.start(peer, lone)
        cl.wait_ready(peer)
        cl.wait_healthy(lone)

        def says_unreachable() -> bool:
            status, body = lone.get("/readyz")
            assert status == 503, body
            return "dht: joining, 1 seeds unreachable" in body["error"]
        wait_until(says_unreachable, 10, "the lone worker to report its dead seed")

        def registered() -> bool:
            status, body = c1.get("/api/registry/ocr")
            return status == 200 and len(body["records"]) == 1
        wait_until(registered, 20, "the coordinator to register the lone worker")
        _status, body = c1.get("/api/registry/llm")
        rec = WorkerRecord.decode(base64.b64decode(body["records"][0]))
        rec.verify()
        assert rec.name == "lone" and rec.endpoint == lone.data["worker"]["endpoint"]
        assert rec.worker_id.hex() == lone.node_id()

        # republished into the DHT: found by a lookup through the coordinator and the peer
        for via in (c1, peer):
            wait_until(lambda via=via: "lone" in via.providers("ocr")[0], 10,
                       f"lookup via {via.name}")
        _status, stats = lone.get("/api/dht/stats")
        assert stats["worker"]["fallback_used"] and stats["worker"]["last_stored_on"] == 0
        _status, cstats = c1.get("/api/dht/stats")
        assert cstats["coordinator"]["registry_size"] == 1
        assert cstats["coordinator"]["republished"] >= 1

        # bad bodies: 4xx with a JSON error, never a 500, nothing registered
        ident = Identity.generate()
        good = WorkerRecord.create(ident, name="x", services=["ocr"], endpoint="https://x",
                                   gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1,
                                   region="", ttl=20)
        expired = WorkerRecord.create(ident, name="x", services=["ocr"], endpoint="https://x",
                                      gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1,
                                      region="", ttl=20, now=time.time() - 60)
        forged = bytearray(good.encode())
        forged[-1] ^= 1                                          # flip a signature bit
        cases = [
            (b"{", 400), (b'{"record": 1}', 400), (b'{"record": "%%%"}', 400),
            (b'{"record": "' + base64.b64encode(b"garbage") + b'"}', 422),
            (b'{"record": "' + base64.b64encode(bytes(forged)) + b'"}', 422),
            (b'{"record": "' + base64.b64encode(expired.encode()) + b'"}', 422),
        ]
        for raw, want in cases:
            status, body = c1.post("/api/services/register", raw=raw)
            assert status == want and isinstance(body, dict) and body.get("error"), (raw, body)
        status, body = peer.post("/api/services/register", raw=b'{"record": "x"}')
        assert status == 404 and "coordinator" in body["error"]
        _status, body = c1.get("/api/registry/ocr")
        assert len(body["records"]) == 1

        # a reload that gives it a live seed: it joins and announces through the DHT itself
        lone.data["dht"]["bootstrap"] = [c1.dht_addr]
        lone.write_config()
        cl.kill(lone, signal.SIGHUP)
        cl.wait_ready(lone, timeout=15)

        def announced_via_dht() -> bool:
            _status, stats = lone.get("/api/dht/stats")
            return stats["joined"] and stats["worker"]["last_stored_on"] > 0
        wait_until(announced_via_dht, 10, "the lone worker to announce through the DHT")
        assert "rejoining" in lone.log_text()

        # the lone worker leaves: its tombstone reaches the coordinator as well
        assert cl.stop(lone) == 0
        _status, body = c1.get("/api/registry/ocr")
        assert body["records"] == []
