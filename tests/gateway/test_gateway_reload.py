"""``systemctl reload`` (SIGHUP) applies ``[gateway.upstreams]``: a service added with its
upstream is proxied and health checked at once; one whose upstream changes is proxied to
the new one; the gateway's listener itself stays where it is."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.cluster import Cluster, http, wait_until
from tests.gateway.upstream import Upstream

pytestmark = pytest.mark.slow


def test_reload_applies_upstreams(tmp_path: Path) -> None:
    a, b = Upstream().start(), Upstream().start()
    try:
        with Cluster(tmp_path) as cl:
            w = cl.worker("rw", [], services=["one"], extra={
                "gateway": {"upstreams": {"one": a.url}}})
            cl.start(w)
            cl.wait_healthy(w)
            wait_until(lambda: http("GET", w.gateway_url + "/one/health")[0] == 200, 10,
                       "gateway up")
            assert http("GET", w.gateway_url + "/two/health")[0] == 404
            before_a, before_b = a.hits["health"], b.hits["health"]

            w.data["worker"]["services"] = ["one", "two"]
            w.data["gateway"]["upstreams"] = {"one": b.url, "two": {"url": a.url,
                                                                     "health": "/health"}}
            w.write_config()
            cl.kill(w, signal.SIGHUP)
            wait_until(lambda: http("GET", w.gateway_url + "/two/health")[0] == 200, 10,
                       "service two proxied after reload")
            status, _ = http("GET", w.gateway_url + "/one/health")
            assert status == 200 and b.hits["health"] > before_b     # one now goes to b
            stats = w.get("/api/dht/stats")[1]["gateway"]
            assert set(stats["upstreams"]) == {"one", "two"}
            wait_until(lambda: w.get("/api/dht/stats")[1]["gateway"]["upstreams"]["two"]
                       ["state"] == "up", 10, "two health checked")
            assert a.hits["health"] > before_a
    finally:
        a.stop()
        b.stop()
