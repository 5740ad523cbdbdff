"""Admin requests only this box may make: the check on the connection's peer address,
never on headers — for real across network namespaces, and the check function itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from agent.http.local_caller import local_caller
from tests.netns.netlab import NetLab, available
from tests.util import agent_cmd, agent_env, stop_process, wait_for, write_config


class _Transport:
    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def _req(peer: Any, headers: dict[str, str] | None = None) -> Any:
    return make_mocked_request("POST", "/api/services/ocr/report", headers=headers or {},
                               transport=_Transport(peer))


def test_local_caller_is_decided_by_the_peer_address_only():
    assert local_caller(_req(("127.0.0.1", 5000)))
    assert local_caller(_req(("127.0.0.2", 5000)))
    assert local_caller(_req(("::1", 5000, 0, 0)))
    assert local_caller(_req(("::ffff:127.0.0.1", 5000, 0, 0)))
    assert not local_caller(_req(("192.0.2.7", 5000)))
    assert not local_caller(_req(("2001:db8::1", 5000, 0, 0)))
    assert not local_caller(_req(None))                     # unknown peer: not local
    # a forwarding header claiming loopback does not help a remote peer ...
    assert not local_caller(_req(("192.0.2.7", 5000), {"X-Forwarded-For": "127.0.0.1"}))
    # ... and makes a loopback peer (a proxy on this box relaying someone) not local
    for h in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "CF-Connecting-IP"):
        assert not local_caller(_req(("127.0.0.1", 5000), {h: "127.0.0.1"})), h


@pytest.mark.slow
@pytest.mark.skipif(available() is not None and not os.environ.get("CI"),
                    reason=str(available()))
def test_report_and_load_refused_from_another_host(tmp_path: Path) -> None:
    """A worker whose admin API is (mis)configured onto a real interface: a host next to
    it gets 403 JSON for report and load; the box itself is served."""
    with NetLab() as lab:
        lab.add_public("agent")
        lab.add_public("caller")
        agent_ip = lab.addrs["agent"]
        cfg = write_config(tmp_path / "w.toml", {
            "agent": {"role": "worker", "name": "w", "state_dir": str(tmp_path / "state")},
            "dht": {"listen": f"{agent_ip}:8468", "mode": "server"},
            "http": {"listen": "0.0.0.0:8080"},
            "worker": {"services": ["ocr"], "endpoint": "https://w.example.org",
                       "gpu": "T4", "gpu_memory_gb": 16},
            "log": {"level": "info"},
        })
        log = open(tmp_path / "agent.log", "wb")
        proc = lab.popen("agent", *agent_cmd("run", "-c", str(cfg)), env=agent_env(),
                         stdout=log, stderr=log)
        try:
            def curl(host: str, method: str, url: str, body: dict[str, Any],
                     *headers: str) -> tuple[int, Any]:
                args = ["curl", "-s", "-m", "5", "-X", method, "-w", "\n%{http_code}",
                        "-H", "Content-Type: application/json", "--data", json.dumps(body)]
                for h in headers:
                    args += ["-H", h]
                res = lab.run(host, *args, url)
                payload, _, code = res.stdout.rpartition("\n")
                try:
                    return int(code or 0), json.loads(payload)
                except ValueError:
                    return int(code or 0), payload

            wait_for(lambda: lab.run("agent", "curl", "-s", "-o", "/dev/null", "-w",
                                     "%{http_code}", "http://127.0.0.1:8080/healthz"
                                     ).stdout == "200", 30, what="agent up")
            report = {"worker_id": "ab" * 20, "ok": False}
            remote = f"http://{agent_ip}:8080"
            for url, method, body in ((f"{remote}/api/services/ocr/report", "POST", report),
                                      (f"{remote}/api/worker/load", "PUT", {"inflight": 3})):
                status, answer = curl("caller", method, url, body)
                assert status == 403 and "this box only" in answer["error"], (status, answer)
                status, answer = curl("caller", method, url, body,
                                      "X-Forwarded-For: 127.0.0.1")
                assert status == 403, (status, answer)
            local = "http://127.0.0.1:8080"
            status, answer = curl("agent", "POST", f"{local}/api/services/ocr/report", report)
            assert status == 200 and answer["healthy"] is False, (status, answer)
            status, answer = curl("agent", "PUT", f"{local}/api/worker/load", {"inflight": 3})
            assert status == 200 and answer["inflight"] == 3, (status, answer)
            status, answer = curl("agent", "POST", f"{local}/api/services/ocr/report", report,
                                  "X-Forwarded-For: 203.0.113.9")
            assert status == 403, (status, answer)
        finally:
            stop_process(proc)
            log.close()
