"""Real hosts, a real NAT and real packet loss (network namespaces, root only).

A coordinator and a worker on a public subnet, and a worker behind a masquerading
router (a home NAT). With ``dht.mode = "auto"`` the NAT-ed worker must find out it is
not reachable on UDP and run as a DHT client: never in anyone's routing table, yet found
by every lookup. Then 10 % of routed packets are dropped and lookups still find everyone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster import Cluster, Node
from tests.netns.netlab import NetLab, available
from tests.util import requires, wait_for

# no lab here: a skip on a developer's machine, a failure in CI (never a silent skip)
pytestmark = [pytest.mark.slow, requires(available())]


def _provider_names(node: Node) -> set[str]:
    """Names a lookup from ``node`` finds; empty when the lookup itself failed (counted as
    a miss under loss, not an error)."""
    status, body = node.get("/api/dht/providers/ocr", timeout=5.0)
    return {r["name"] for r in body["records"]} if status == 200 else set()


def _stats(node: Node) -> dict:
    status, body = node.get("/api/dht/stats")
    assert status == 200, f"{node.name}: /api/dht/stats -> {status} {body}"
    return body


def test_nat_worker_runs_as_client_and_is_found_under_loss(tmp_path: Path) -> None:
    with NetLab() as lab, Cluster(tmp_path, record_ttl=30, republish=3) as cl:
        coord_ip = lab.add_public("coord")
        pub_ip = lab.add_public("pub")
        home_ip = lab.add_home("home")
        debug = {"log": {"level": "debug"}}
        coord = cl.coordinator("coord", ip=coord_ip, exec_prefix=lab.exec_argv("coord"),
                               extra=debug)

        def auto_worker(name: str, ip: str, endpoint: str) -> Node:
            return cl.worker(name, [coord.dht_addr], mode="auto", ip=ip,
                             exec_prefix=lab.exec_argv(name),
                             extra={**debug, "dht": {"listen": "0.0.0.0:8468"},
                                    "worker": {"endpoint": endpoint}})

        pub = auto_worker("pub", pub_ip, f"http://{pub_ip}:8090")
        home = auto_worker("home", home_ip, "https://home-box.example.org")
        nodes = [coord, pub, home]
        cl.start(*nodes)
        cl.wait_ready(*nodes)

        # auto mode settles once a seed answers the reachability probe
        wait_for(lambda: _stats(pub)["mode"] == "server", 15,
                 what="public worker turns server")
        stats = {n.name: _stats(n) for n in nodes}
        assert stats["pub"]["mode"] == "server", stats["pub"]
        assert stats["home"]["mode"] == "client", (
            "the NAT-ed worker must detect it is unreachable", home.log_text()[-3000:])

        # everyone finds both workers
        for n in nodes:
            wait_for(lambda n=n: _provider_names(n) == {"pub", "home"}, 20,
                     what=f"lookup from {n.name} finds pub and home")

        # the client is in nobody's routing table; the public worker is
        home_id = stats["home"]["node_id"]
        pub_id = stats["pub"]["node_id"]
        for n in (coord, pub):
            _, topo = n.get("/api/dht/topology")
            ids = {x["id"] for x in topo["nodes"]}
            assert home_id not in ids, f"client node in {n.name}'s routing table"
        _, topo = coord.get("/api/dht/topology")
        assert pub_id in {x["id"] for x in topo["nodes"]}

        # 10 % loss on every routed packet: lookups across the NAT keep answering
        lab.lossy(10)
        found = 0
        for _ in range(20):
            for n in (home, coord):
                found += _provider_names(n) == {"pub", "home"}
            time.sleep(0.2)          # pacing: 40 lookups spread over the lossy period
        assert found >= 38, f"only {found}/40 lookups found both workers under 10 % loss"
        lab.heal()
