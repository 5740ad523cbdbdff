"""``dht.mode = "auto"`` across a real NAT (network namespaces, root only).

A coordinator and a worker on the public subnet, and a worker behind a masquerading
router that drops new inbound flows. Both workers run in auto mode: the public one must
become a server, the NAT-ed one a client — and the NAT-ed one must still be found by
everyone while sitting in nobody's routing table.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.cluster import REPO, Cluster, wait_until
from tests.netns import netlab

pytestmark = pytest.mark.slow

_why = netlab.available()
if _why and not os.environ.get("CI"):   # in CI (.ci/run installs ip and nft) run, never skip
    pytest.skip(f"network namespaces unavailable: {_why}", allow_module_level=True)


def test_auto_mode_behind_nat(tmp_path) -> None:
    with netlab.NetLab() as lab, Cluster(tmp_path, record_ttl=20, republish=3) as cl:
        hosts = {name: (lab.add_public(name) if name != "home" else lab.add_home(name))
                 for name in ("coord", "pub", "home")}

        def place(name: str) -> dict[str, object]:
            return {"ip": hosts[name], "exec_prefix": lab.exec_argv(name)}

        coord = cl.coordinator("coord", **place("coord"))
        cl.start(coord)
        cl.wait_ready(coord)
        seeds = [coord.dht_addr]
        pub = cl.worker("pub", seeds, mode="auto", **place("pub"))
        home = cl.worker("home", seeds, mode="auto", **place("home"))
        cl.start(pub, home)
        cl.wait_ready(pub, home)

        modes = {n.name: n.get("/api/dht/stats")[1]["mode"] for n in (pub, home)}
        assert modes == {"pub": "server", "home": "client"}, modes
        home_id = home.node_id()
        for observer in (coord, pub, home):
            wait_until(lambda o=observer: {"pub", "home"} <= o.providers("ocr")[0], 15,
                       f"{observer.name} finds both workers")
        for observer in (coord, pub):
            ids = {n["id"] for n in observer.get("/api/dht/topology")[1]["nodes"]}
            assert home_id not in ids, f"{observer.name} put the NAT-ed node in its table"

        # The post-join probe (auto mode still undecided after joining) pings a fresh
        # port: after DHT traffic to the seed, a port-preserving NAT could let a ping to
        # the DHT port through on the existing mapping; a fresh port has no mapping.
        def probe(host: str, port: str) -> str:
            seed = hosts["coord"]
            code = (f"import asyncio, sys; sys.path.insert(0, {str(REPO)!r}); "
                    "from agent.dht.component import probe_reachable; "
                    f"print(asyncio.run(probe_reachable(({seed!r}, 8468), {port}, '0.0.0.0')))")
            res = lab.run(host, sys.executable, "-c", code, timeout=20)
            assert res.returncode == 0, res.stderr
            return res.stdout.strip()
        assert probe("home", "None") == "False"       # fresh port: not reachable (NAT)
        assert probe("pub", "None") == "True"         # fresh port on a public host: reachable
