"""40 worker agents serving one service, as real processes on loopback UDP.

What the in-process simulation (``test_scale``, ``bench/scale.py``) cannot show: the whole
agent (config, roles, republish timers, HTTP API) at a service size past one DHT answer
(20 records). Every worker is found from a worker and from a coordinator, ``/api/services``
counts all 40 through the sharded service index, and after 30 % are killed (SIGKILL, no
goodbye) every live worker is still found at once and the dead ones leave at expiry.
"""

from __future__ import annotations

import pytest

from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow

N_WORKERS = 40
RECORD_TTL = 15
REPUBLISH = 5
QUIET = {"log": {"level": "warning"}}


def test_forty_workers_found_from_worker_and_coordinator_then_30pct_killed(tmp_path):
    with Cluster(tmp_path, record_ttl=RECORD_TTL, republish=REPUBLISH) as cl:
        c1 = cl.coordinator("c1", extra=QUIET)
        c2 = cl.coordinator("c2", seeds=[c1.dht_addr], extra=QUIET)
        cl.start(c1)
        cl.wait_ready(c1, timeout=30)
        cl.start(c2)
        seeds = [c1.dht_addr, c2.dht_addr]
        workers = [cl.worker(f"w{i:02d}", seeds, services=["big"], extra=QUIET)
                   for i in range(N_WORKERS)]
        for k in range(0, N_WORKERS, 10):  # in batches: 40 interpreters starting at once
            cl.start(*workers[k:k + 10])   # on a shared 2-core runner time out readiness
            cl.wait_ready(*workers[k:k + 10], timeout=90)
        cl.wait_ready(c2, timeout=30)
        names = {w.name for w in workers}

        asker = workers[7]
        wait_until(lambda: c1.providers("big")[0] == names and asker.providers("big")[0] == names
                   and c2.providers("big")[0] == names,
                   3 * REPUBLISH + 10, "all 40 workers found from c1, c2 and w07")
        status, body = c1.get("/api/services")
        assert status == 200 and {"name": "big", "workers": N_WORKERS} in body["services"], body

        # 30 % killed without goodbye: every live worker is still found, at once
        victims = workers[:12]
        for v in victims:
            cl.kill(v)
        live = names - {v.name for v in victims}
        for who in (c1, c2, workers[20], workers[39]):
            found = who.providers("big")[0]
            assert live <= found, (who.name, sorted(live - found))
        # and the dead leave when their records expire (no tombstone was sent)
        wait_until(lambda: c1.providers("big")[0] == live
                   and workers[30].providers("big")[0] == live,
                   RECORD_TTL + 2 * REPUBLISH + 10, "dead workers gone after their ttl")
