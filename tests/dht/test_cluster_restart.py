"""A coordinator restarted without configured seeds rejoins from its routing snapshot.

Workers refresh only every 30 s here and nobody else has reason to contact the restarted
coordinator within the test's window, so finding the workers right after the restart
proves the snapshot (not inbound traffic) brought it back into the network.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow


def test_coordinator_restart_rejoins_from_snapshot(tmp_path) -> None:
    with Cluster(tmp_path, record_ttl=60, republish=30) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        c2 = cl.coordinator("c2", seeds=[c1.dht_addr])
        workers = [cl.worker(f"w{i}", [c1.dht_addr]) for i in range(3)]
        cl.start(c2, *workers)
        cl.wait_ready(c2, *workers)
        names = {w.name for w in workers}
        wait_until(lambda: c2.providers("ocr")[0] >= names, 20, "c2 finds the workers")
        c2_id = c2.node_id()

        assert cl.stop(c2) == 0, c2.log_text()[-2000:]
        snap = json.loads((c2.state_dir / "routing.json").read_text())
        assert snap["node_id"] == c2_id
        assert {(c["ip"], c["port"]) for c in snap["contacts"]} >= {
            (n.ip, n.udp_port) for n in (c1, *workers)}

        c2.data["dht"]["bootstrap"] = []          # restart with no configured seeds
        cl.start(c2)
        cl.wait_ready(c2)

        def rejoined() -> bool:
            status, stats = c2.get("/api/dht/stats")
            return status == 200 and stats["joined"] and stats["peers"] >= 3
        wait_until(rejoined, 8, "c2 to rejoin from its snapshot")
        _status, stats = c2.get("/api/dht/stats")
        assert stats["node_id"] == c2_id                       # same identity after restart
        assert stats["seeds"]["from_snapshot"] >= 4, stats["seeds"]
        assert c2.providers("ocr")[0] >= names                 # lookups work through it
        assert "joined via" in c2.log_text().split("listening on")[-1]
