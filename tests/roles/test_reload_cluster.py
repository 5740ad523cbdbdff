"""``systemctl reload`` (SIGHUP) on a running worker keeps its announcement.

Real processes: a coordinator and a worker. The worker's region changes on disk, SIGHUP
applies it; throughout, every lookup from the coordinator still finds the worker (the
reload never withdraws it), the same process keeps running, and the new region shows
up in the record, re-announced by the reload itself (the log says so), not by a
later periodic refresh.
"""

from __future__ import annotations

import signal

import pytest

from tests.cluster import Cluster
from tests.util import wait_for

pytestmark = pytest.mark.slow


def test_sighup_keeps_the_worker_announced_and_applies_the_change(tmp_path) -> None:
    with Cluster(tmp_path, record_ttl=30, republish=10) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        w1 = cl.worker("w1", [c1.dht_addr])
        w1.data["agent"]["region"] = "eu-west"
        w1.write_config()
        cl.start(w1)
        cl.wait_ready(w1)

        def regions() -> list[str]:
            return [r["region"] for r in c1.provider_records("ocr")[0] if r["name"] == "w1"]

        wait_for(lambda: regions() == ["eu-west"], 20, what="w1 found in eu-west")
        pid = w1.proc.pid
        w1.data["agent"]["region"] = "us-east"
        w1.write_config()
        w1.proc.send_signal(signal.SIGHUP)

        seen: list[list[str]] = []       # every lookup from the SIGHUP on

        def moved() -> bool:
            seen.append(regions())
            return seen[-1] == ["us-east"] and len(seen) > 3

        wait_for(moved, 30, 0.2, "w1's record in us-east after the reload")
        assert all(s for s in seen), f"the worker vanished during the reload: {seen}"
        assert w1.proc.poll() is None and w1.proc.pid == pid
        log = w1.log_text()
        assert "configuration reloaded" in log
        # re-announced by the reload itself, not by a later periodic refresh
        assert "worker: config changed: re-announcing" in log, log[-2000:]
