"""Real hosts, a real NAT and real packet loss (network namespaces, root only).

A coordinator and a worker on a public subnet, and a worker behind a masquerading
router (a home NAT). With ``dht.mode = "auto"`` the NAT-ed worker must find out it is
not reachable on UDP and run as a DHT client: never in anyone's routing table, yet found
by every lookup. Then 10 % of routed packets are dropped and lookups still find everyone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns.netlab import NetLab, available
from tests.util import agent_cmd, agent_env, stop_process, wait_for, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None and not os.environ.get("CI"),
                                 reason=str(available()))]

DHT_PORT = 8468
HTTP = "127.0.0.1:8080"   # each host has its own loopback


def _config(tmp: Path, name: str, role: str, listen: str, seed: str | None,
            endpoint: str | None) -> Path:
    data: dict[str, dict[str, Any]] = {
        "agent": {"role": role, "name": name, "state_dir": str(tmp / f"state-{name}"),
                  "region": "eu-west"},
        "dht": {"listen": listen, "mode": "server" if role == "coordinator" else "auto",
                "record_ttl": 30, "republish_interval": 3},
        "http": {"listen": HTTP},
        "log": {"level": "debug"},
    }
    if seed:
        data["dht"]["bootstrap"] = [seed]
    if role == "worker":
        data["worker"] = {"services": ["ocr"], "endpoint": endpoint, "gpu": "A100",
                          "gpu_memory_gb": 80}
    return write_config(tmp / f"{name}.toml", data)


def _get(lab: NetLab, host: str, path: str) -> tuple[int, Any]:
    res = lab.run(host, "curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://{HTTP}{path}")
    if res.returncode != 0:
        return 0, None
    body, _, code = res.stdout.rpartition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return int(code or 0), body


def _provider_names(lab: NetLab, host: str) -> set[str]:
    status, body = _get(lab, host, "/api/dht/providers/ocr")
    return {r["name"] for r in body["records"]} if status == 200 else set()


def test_nat_worker_runs_as_client_and_is_found_under_loss(tmp_path: Path) -> None:
    with NetLab() as lab:
        coord_ip = lab.add_public("coord")
        pub_ip = lab.add_public("pub")
        lab.add_home("home")
        seed = f"{coord_ip}:{DHT_PORT}"
        cfgs = {
            "coord": _config(tmp_path, "coord", "coordinator", seed, None, None),
            "pub": _config(tmp_path, "pub", "worker", f"0.0.0.0:{DHT_PORT}", seed,
                           f"http://{pub_ip}:8080"),
            "home": _config(tmp_path, "home", "worker", f"0.0.0.0:{DHT_PORT}", seed,
                            "https://home-box.example.org"),
        }
        procs = {}
        try:
            for host, cfg in cfgs.items():
                log = (tmp_path / f"{host}.log").open("wb")
                procs[host] = lab.popen(host, *agent_cmd("run", "-c", str(cfg)),
                                        env=agent_env(), stdout=log, stderr=log)
            for host in cfgs:
                wait_for(lambda h=host: _get(lab, h, "/readyz")[0] == 200, 30,
                         what=f"{host} ready")

            # auto mode settles once a seed answers the reachability probe
            wait_for(lambda: _get(lab, "pub", "/api/dht/stats")[1]["mode"] == "server", 15,
                     what="public worker turns server")
            stats = {h: _get(lab, h, "/api/dht/stats")[1] for h in cfgs}
            assert stats["pub"]["mode"] == "server", stats["pub"]
            assert stats["home"]["mode"] == "client", (
                "the NAT-ed worker must detect it is unreachable",
                (tmp_path / "home.log").read_text()[-3000:])

            # everyone finds both workers
            for host in cfgs:
                wait_for(lambda h=host: _provider_names(lab, h) == {"pub", "home"}, 20,
                         what=f"lookup from {host} finds pub and home")

            # the client is in nobody's routing table; the public worker is
            home_id = stats["home"]["node_id"]
            pub_id = stats["pub"]["node_id"]
            for host in ("coord", "pub"):
                _, topo = _get(lab, host, "/api/dht/topology")
                ids = {n["id"] for n in topo["nodes"]}
                assert home_id not in ids, f"client node in {host}'s routing table"
            _, topo = _get(lab, "coord", "/api/dht/topology")
            assert pub_id in {n["id"] for n in topo["nodes"]}

            # 10 % loss on every routed packet: lookups across the NAT keep answering
            lab.lossy(10)
            found = 0
            for _ in range(20):
                for host in ("home", "coord"):
                    found += _provider_names(lab, host) == {"pub", "home"}
                time.sleep(0.2)
            assert found >= 38, f"only {found}/40 lookups found both workers under 10 % loss"
            lab.heal()
        finally:
            for proc in procs.values():
                stop_process(proc)
