"""The admin API refuses cross-site state changes (agent.http.same_site): the rule on
mocked requests, then a real worker process attacked the way a web page would (a
``text/plain`` POST from a foreign origin, a DNS-rebound ``Host``) while the CLI-shaped
and the dashboard-shaped (same-origin) requests still work."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from agent.http.same_site import cross_site_refusal, host_name
from tests.util import (
    agent_cmd,
    agent_env,
    free_port,
    free_udp_tcp_port,
    http_get,
    stop_process,
    wait_for,
    write_config,
)


def _refusal(method: str, headers: dict[str, str], listen: str = "127.0.0.1",
             path: str = "/api/worker/load") -> str | None:
    return cross_site_refusal(make_mocked_request(method, path, headers=headers), listen)


@pytest.mark.parametrize("headers", [
    {"Host": "127.0.0.1:8080"},                                        # the CLI
    {"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080",
     "Sec-Fetch-Site": "same-origin"},                                 # the dashboard
    {"Host": "localhost:8080", "Origin": "http://localhost:8080"},
    {"Host": "[::1]:8080"},
    {"Host": "192.168.1.5:8080"},                                      # an IP literal
    {"Host": "127.0.0.1:8080", "Sec-Fetch-Site": "none"},              # typed by the user
    {"Host": "gpu-box.lan:8080", "User-Agent": "rma-agent-call"},      # not a browser
])
def test_local_callers_and_the_own_dashboard_pass(headers: dict[str, str]) -> None:
    assert _refusal("POST", headers) is None


CROSS_SITE = [
    {"Host": "127.0.0.1:8080", "Origin": "http://evil.example"},
    {"Host": "127.0.0.1:8080", "Origin": "null"},
    {"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:9999"},    # another local port
    {"Host": "127.0.0.1:8080", "Sec-Fetch-Site": "cross-site"},
    {"Host": "127.0.0.1:8080", "Sec-Fetch-Site": "same-site"},
]
REBOUND = [
    {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"},
    {"Host": "evil.example:8080", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"},
    {"Host": "evil.example:8080", "Sec-Fetch-Mode": "no-cors"},
    {"Host": "", "Sec-Fetch-Dest": "empty"},
]


@pytest.mark.parametrize("headers", CROSS_SITE + REBOUND)
def test_cross_site_and_rebound_state_changes_are_refused(headers: dict[str, str]) -> None:
    assert _refusal("POST", headers) is not None
    # the router's GETs make a worker work: refused as well
    assert _refusal("GET", headers, path="/route/ocr/v1/run") is not None


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_cross_site_reads_pass(headers: dict[str, str]) -> None:
    """A foreign page may make the browser read (a link to the dashboard), but the API
    sends no CORS headers: the page cannot see the answer."""
    assert _refusal("GET", headers) is None
    assert _refusal("GET", headers, path="/api/dht/topology") is None


@pytest.mark.parametrize("headers", REBOUND)
def test_rebound_reads_are_refused(headers: dict[str, str]) -> None:
    """A rebound page is same-origin to the browser: it could read every answer."""
    for path in ("/api/dht/stats", "/api/dht/topology", "/", "/api/services/ocr"):
        assert _refusal("GET", headers, path=path) is not None, path


def test_the_configured_listen_host_passes() -> None:
    assert _refusal("PUT", {"Host": "gpu-box.lan:8080"}, listen="gpu-box.lan") is None
    assert host_name("[::1]:80") == "::1" and host_name("LocalHost.:1") == "localhost"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("same-site")
    port = free_port()
    cfg = write_config(tmp / "w.toml", {
        "agent": {"role": "worker", "name": "w", "state_dir": str(tmp / "state")},
        "dht": {"listen": f"127.0.0.1:{free_udp_tcp_port()}", "mode": "server"},
        "http": {"listen": f"127.0.0.1:{port}"},
        "gateway": {"listen": f"127.0.0.1:{free_port()}"},
        "worker": {"services": ["ocr"], "endpoint": "https://w.example.org", "gpu": "T4",
                   "gpu_memory_gb": 16},
        "log": {"level": "info"},
    })
    with open(tmp / "agent.log", "wb") as log:
        proc = subprocess.Popen(agent_cmd("run", "-c", str(cfg)), env=agent_env(),
                                stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: http_get(url + "/healthz")[0] == 200, 30, what="agent up")
            yield f"127.0.0.1:{port}"
        finally:
            stop_process(proc)


def _put_load(addr: str, value: int, **headers: str) -> tuple[int, Any]:
    """PUT /api/worker/load as a browser would send it (text/plain needs no preflight)."""
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("PUT", "/api/worker/load", skip_host=True)
        conn.putheader("Host", headers.pop("Host", addr))
        conn.putheader("Content-Type", "text/plain")
        for k, v in headers.items():
            conn.putheader(k.replace("_", "-"), v)
        body = json.dumps({"inflight": value}).encode()
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_a_foreign_page_cannot_change_a_workers_load(worker: str) -> None:
    status, body = _put_load(worker, 3)                              # the CLI's shape
    assert status == 200 and body["inflight"] == 3, body
    for headers in ({"Origin": "http://evil.example"},
                    {"Sec_Fetch_Site": "cross-site", "Origin": "http://evil.example"},
                    {"Host": f"evil.example:{worker.split(':')[1]}",
                     "Origin": f"http://evil.example:{worker.split(':')[1]}"}):
        status, body = _put_load(worker, 9, **headers)
        assert status == 403 and "cross-site request refused" in body["error"], body
    # the dashboard's shape (same origin) still changes it; nothing refused leaked through
    status, body = _put_load(worker, 3, Origin=f"http://{worker}",
                             Sec_Fetch_Site="same-origin")
    assert status == 200 and body["inflight"] == 3, body
    status, _ = http_get(f"http://{worker}/api/dht/stats")           # the CLI reads
    assert status == 200
    port = worker.split(":")[1]
    status, body = _get(worker, "/api/dht/stats", {"Host": f"evil.example:{port}",
                                                   "User-Agent": "Mozilla/5.0"})
    assert status == 403 and "DNS rebinding" in body["error"], body
    status, body = _get(worker, "/route/ocr/run", {"Sec-Fetch-Site": "cross-site",
                                                   "Sec-Fetch-Mode": "no-cors"})
    assert status == 403 and "cross-site request refused" in body["error"], body


def _get(addr: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """A GET as a browser page would send it (its own Host and fetch metadata)."""
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", headers.pop("Host", addr))
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()
