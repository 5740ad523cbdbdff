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
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.cli import join_config
from tests.cluster import Cluster, _die_with_parent
from tests.util import REPO, agent_env, free_port, free_udp_tcp_port, http, wait_for

pytestmark = pytest.mark.slow


class TextServer:
    """A plain upstream on a free loopback port: fixed texts by path, 404 otherwise."""

    def __init__(self, pages: dict[str, str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                text = pages.get(self.path)
                data = (text if text is not None else "not found\n").encode()
                self.send_response(200 if text is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def join_argv(coordinator: str, tmp: Path, ports: dict[str, int], upstream: str,
              *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent", "join", coordinator,
            "--service", f"files={upstream}", "--name", "joined-1",
            "-c", str(tmp / "agent.toml"), "--state-dir", str(tmp / "state"),
            "--endpoint", f"http://127.0.0.1:{ports['gw']}",
            "--dht-listen", f"127.0.0.1:{ports['udp']}",
            "--http-listen", f"127.0.0.1:{ports['http']}",
            "--gateway-listen", f"127.0.0.1:{ports['gw']}", "--no-start", *extra]


def test_join_writes_config_and_waits_until_the_coordinator_finds_the_worker(tmp_path):
    upstream = TextServer({"/hello": "hello from the joined box\n", "/": "ok\n"})
    ports = {"udp": free_udp_tcp_port(), "http": free_port(), "gw": free_port()}
    worker: subprocess.Popen[bytes] | None = None
    with Cluster(tmp_path / "cl") as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        argv = join_argv(c1.gateway_url, tmp_path, ports, upstream.url, "--timeout", "40")
        join = subprocess.Popen(argv, cwd=REPO, env=agent_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            cfg = tmp_path / "agent.toml"
            wait_for(lambda: join_config.ownership(cfg) == "ours" or join.poll() is not None,
                     30, what="join wrote the config")
            log = open(tmp_path / "worker.log", "ab")
            worker = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                                      cwd=REPO, env=agent_env(), stdout=log,
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
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
            again = subprocess.run(join_argv(c1.gateway_url, tmp_path, ports, upstream.url,
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
                worker.terminate()
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
                log.close()
            upstream.close()


def test_join_fails_clearly_when_the_coordinator_does_not_answer(tmp_path):
    ports = {"udp": free_udp_tcp_port(), "http": free_port(), "gw": free_port()}
    r = subprocess.run(join_argv(f"http://127.0.0.1:{free_port()}", tmp_path, ports,
                                 "http://127.0.0.1:9", "--timeout", "0"),
                       cwd=REPO, env=agent_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot reach the coordinator" in r.stderr
    assert not (tmp_path / "agent.toml").exists()         # nothing written
