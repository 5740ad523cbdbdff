"""``systemctl reload`` (SIGHUP) on a running worker keeps its announcement.

Real processes: a coordinator and a worker. The worker's region changes on disk, SIGHUP
applies it; throughout, every lookup from the coordinator still finds the worker (the
reload never withdraws it), the same process keeps running, and the new region shows
up in the record within a republish.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.cluster import Cluster, wait_until

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

        wait_until(lambda: regions() == ["eu-west"], 20, "w1 found in eu-west")
        pid = w1.proc.pid
        w1.data["agent"]["region"] = "us-east"
        w1.write_config()
        w1.proc.send_signal(signal.SIGHUP)

        seen: list[list[str]] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seen.append(regions())
            if seen[-1] == ["us-east"] and len(seen) > 3:
                break
            time.sleep(0.2)
        assert all(s for s in seen), f"the worker vanished during the reload: {seen}"
        assert seen[-1] == ["us-east"], seen[-5:]
        assert w1.proc.poll() is None and w1.proc.pid == pid
        assert "configuration reloaded" in w1.log_text()
