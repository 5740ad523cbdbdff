"""``rma-agent join`` end to end on loopback (open network), outside systemd.

A real coordinator process; ``rma-agent join URL --no-start ...`` writes the worker's
config and waits; the test starts the agent from that config (what ``systemctl enable
--now`` does on a box) and join must report the worker found by a lookup through the
coordinator, which then routes a request to the worker's upstream. A second run with
the same arguments changes nothing (same identity, config untouched). The booted-Debian
version with systemd and the .deb is tests/appliance/test_join_appliance.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.cli import join_config
from tests.cluster import AgentProcess, Cluster, join_argv, join_ports
from tests.util import REPO, PageServer, agent_env, free_port, http, wait_for

pytestmark = pytest.mark.slow


def _join(coordinator: str, tmp: Path, ports: dict[str, int], upstream: str,
          *extra: str) -> list[str]:
    return join_argv(coordinator, tmp, ports, f"files={upstream}", "joined-1", *extra)


def test_join_writes_config_and_waits_until_the_coordinator_finds_the_worker(tmp_path):
    upstream = PageServer({"/hello": b"hello from the joined box\n", "/": b"ok\n"})
    ports = join_ports()
    worker: AgentProcess | None = None
    with Cluster(tmp_path / "cl") as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        argv = _join(c1.gateway_url, tmp_path, ports, upstream.url, "--timeout", "40")
        join = subprocess.Popen(argv, cwd=REPO, env=agent_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            cfg = tmp_path / "agent.toml"
            wait_for(lambda: join_config.ownership(cfg) == "ours" or join.poll() is not None,
                     30, what="join wrote the config")
            worker = AgentProcess(cfg, tmp_path / "worker.log")
            out, _ = join.communicate(timeout=60)
            assert join.returncode == 0, out + (tmp_path / "worker.log").read_text()[-3000:]
            assert "found by the network (dht lookup)" in out, out
            assert f"http://127.0.0.1:{ports['gw']}" in out
            first_config = cfg.read_bytes()
            key = (tmp_path / "state" / "identity.key").read_bytes()

            # a routed request from the coordinator reaches the upstream through the worker
            status, body = http("GET", c1.url + "/route/files/hello", timeout=10)
            assert (status, body) == (200, "hello from the joined box\n")

            # running it again changes nothing
            again = subprocess.run(_join(c1.gateway_url, tmp_path, ports, upstream.url,
                                         "--timeout", "0"),
                                   cwd=REPO, env=agent_env(), capture_output=True, text=True,
                                   timeout=60)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "config " + str(cfg) + ": unchanged" in again.stdout
            assert "kept in" in again.stdout
            assert cfg.read_bytes() == first_config
            assert (tmp_path / "state" / "identity.key").read_bytes() == key
        finally:
            if join.poll() is None:
                join.kill()
                join.communicate()
            if worker is not None:
                worker.stop()
            upstream.close()


def test_join_fails_clearly_when_the_coordinator_does_not_answer(tmp_path):
    ports = join_ports()
    r = subprocess.run(_join(f"http://127.0.0.1:{free_port()}", tmp_path, ports,
                             "http://127.0.0.1:9", "--timeout", "0"),
                       cwd=REPO, env=agent_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot reach the coordinator" in r.stderr
    assert not (tmp_path / "agent.toml").exists()         # nothing written
