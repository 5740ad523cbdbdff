"""A coordinator and a worker talking DHT over IPv6 loopback (real processes, real UDP)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.util import agent_cmd, agent_env, http_get, stop_process, wait_for, write_config


def _v6_port(kind: int) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _have_v6() -> bool:
    try:
        _v6_port(socket.SOCK_DGRAM)
    except OSError:
        return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _have_v6(), reason="no IPv6 loopback")]


def test_worker_found_over_ipv6(tmp_path: Path) -> None:
    c_udp, c_http, w_udp, w_http = (_v6_port(socket.SOCK_DGRAM), _v6_port(socket.SOCK_STREAM),
                                    _v6_port(socket.SOCK_DGRAM), _v6_port(socket.SOCK_STREAM))
    coord = write_config(tmp_path / "c.toml", {
        "agent": {"role": "coordinator", "name": "c6", "state_dir": str(tmp_path / "sc")},
        "dht": {"listen": f"[::1]:{c_udp}", "mode": "server"},
        "http": {"listen": f"[::1]:{c_http}"},
        "gateway": {"listen": f"[::1]:{_v6_port(socket.SOCK_STREAM)}"}})
    worker = write_config(tmp_path / "w.toml", {
        "agent": {"role": "worker", "name": "w6", "state_dir": str(tmp_path / "sw")},
        "dht": {"listen": f"[::1]:{w_udp}", "mode": "auto", "bootstrap": [f"[::1]:{c_udp}"],
                "republish_interval": 3, "record_ttl": 20},
        "http": {"listen": f"[::1]:{w_http}"},
        "gateway": {"listen": f"[::1]:{_v6_port(socket.SOCK_STREAM)}"},
        "worker": {"services": ["ocr"], "endpoint": f"http://[::1]:{w_http}"}})
    procs = [subprocess.Popen(agent_cmd("run", "-c", str(cfg)), env=agent_env(),
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{cfg.stem}.log").open("wb"))
             for cfg in (coord, worker)]
    try:
        def names() -> set[str]:
            status, body = http_get(f"http://[::1]:{c_http}/api/dht/providers/ocr")
            return {r["name"] for r in body["records"]} if status == 200 else set()

        wait_for(lambda: names() == {"w6"}, 20, what="worker found over IPv6")
        # the coordinator may still be starting when the worker first asks it to ping
        # back; auto mode then asks again, and settles on server (reachable over IPv6)
        stats = wait_for(lambda: (s := http_get(f"http://[::1]:{w_http}/api/dht/stats")[1])
                         and s.get("mode") == "server" and s, 20, what="worker turns server")
        assert stats["peers"] >= 1
    finally:
        for p in procs:
            assert stop_process(p) == 0
