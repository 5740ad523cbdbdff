"""Issue 20, items 1 and 3, against real agent processes:

- **paths stay inside their prefix**: a worker fronts ``www = "http://127.0.0.1:P/prefix"``,
  a real file server whose root also holds ``secret.txt``. ``..%2fsecret.txt`` and its
  kin, sent raw, are refused on the worker's gateway and through a caller's ``/route/``,
  and the file server never sees a request outside ``/prefix`` (it does serve the secret to
  a direct request: the test could fail);
- **one address cannot take the gateway**: the worker runs with ``RLIMIT_NOFILE`` = 1024
  (so its caps are 24 per address, 768 in all); one address opens hundreds of idle and
  half-sent connections; another address is still served, the admin API answers, and the
  shed connections are in ``/metrics``.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from agent.proof import PROOF_PATH, new_nonce
from tests.cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.slow

NOFILE = 1024
PER_ADDRESS = 24                      # agent.http.budget.listener_limits(1024)
# python -c: lower the file limit, then run the agent as `python -m agent` would
LOW_NOFILE = ("-c", "import resource, runpy; "
                    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
                    "runpy.run_module('agent', run_name='__main__', alter_sys=True)")
ESCAPES = ["..%2fsecret.txt", "..%2Fsecret.txt", "%2e%2e%2fsecret.txt",
           "%2E%2E%2Fsecret.txt", "..%5csecret.txt", "%2e%2e/secret.txt", "../secret.txt",
           "a%2f..%2f..%2fsecret.txt", "%252e%252e%252fsecret.txt", "..;/secret.txt",
           "..\\secret.txt"]


class FileServer:
    """``http.server`` on a thread over ``root``; records every path it is asked for."""

    def __init__(self, root: Path) -> None:
        self.paths: list[str] = []
        seen = self.paths

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                super().do_GET()

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Net:
    def __init__(self, c1: Node, w1: Node, files: FileServer) -> None:
        self.c1, self.w1, self.files = c1, w1, files


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = Path(tmp_path_factory.mktemp("www"))
    (root / "prefix").mkdir()
    (root / "prefix" / "inside.txt").write_text("INSIDE")
    (root / "secret.txt").write_text("SECRET")
    files = FileServer(root)
    tmp = Path(tmp_path_factory.mktemp("attack"))
    try:
        with Cluster(tmp, record_ttl=30, republish=3) as cl:
            c1 = cl.coordinator("c1")
            cl.start(c1)
            cl.wait_ready(c1)
            w1 = cl.worker("w1", [c1.dht_addr], services=["www"], extra={
                "gateway": {"upstreams": {"www": f"http://127.0.0.1:{files.port}/prefix"}}})
            cl.start(w1, launcher=LOW_NOFILE)
            cl.wait_ready(w1)
            wait_until(lambda: c1.get("/api/services/www")[1].get("workers"), 30,
                       "c1 finds w1 for www")
            yield Net(c1, w1, files)
    finally:
        files.stop()


def _raw_get(base: str, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET ``path`` exactly as written (http.client normalises nothing)."""
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10,
                                      source_address=(source, 0))
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("via", ["gateway", "router"])
def test_encoded_slashes_never_leave_the_prefix(net: Net, via: str) -> None:
    base, head = ((net.w1.gateway_url, "/www/") if via == "gateway"
                  else (net.c1.url, "/route/www/"))
    assert _raw_get(f"http://127.0.0.1:{net.files.port}", "/secret.txt") == (200, b"SECRET")
    status, body = _raw_get(base, head + "inside.txt")
    assert (status, body) == (200, b"INSIDE")
    for escape in ESCAPES:
        status, body = _raw_get(base, head + escape)
        assert status == 400 and b"SECRET" not in body, (escape, status, body[:200])
    # only the direct GETs (and the gateway's health checks of /prefix itself)
    outside = [p for p in net.files.paths if p != "/prefix" and not p.startswith("/prefix/")]
    assert outside == ["/secret.txt"] * len(outside), outside


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def _shed_text(node: Node, at_least: int) -> str | None:
    """The node's /metrics once the gateway shed ``at_least`` connections."""
    status, text = node.get("/metrics")
    shed = _metric(text, 'rma_agent_http_shed_total{listener="gateway"') if status == 200 \
        else 0
    return text if shed >= at_least else None


def test_one_address_holding_connections_leaves_the_gateway_to_others(net: Net) -> None:
    gw_host, gw_port = net.w1.gateway_url.split("//", 1)[1].rsplit(":", 1)
    held: list[socket.socket] = []
    try:
        for i in range(300):          # 200 idle, 100 half-sent heads, all from 127.0.0.1
            s = socket.create_connection((gw_host, int(gw_port)), timeout=5,
                                         source_address=("127.0.0.1", 0))
            if i % 3 == 0:
                s.sendall(b"GET /www/inside.txt HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(s)
        # the agent accepts what the kernel queued: wait until each one was dealt with
        text = wait_until(lambda: _shed_text(net.w1, 300 - PER_ADDRESS), 30,
                          "the connections past the address cap shed")
        open_now = _metric(text, 'rma_agent_http_connections{listener="gateway"}')
        assert open_now <= PER_ADDRESS, open_now        # the address holds its cap, no more
        for source in ("127.0.0.2", "127.0.0.3"):
            status, body = _raw_get(net.w1.gateway_url, PROOF_PATH + "?nonce=" + new_nonce(),
                                    source)
            assert status == 200, body[:200]
            status, body = _raw_get(net.w1.gateway_url, "/www/inside.txt", source)
            assert (status, body) == (200, b"INSIDE")
        assert net.w1.get("/healthz")[0] == 200
        # the newest connections of the attacking address are the ones kept
        assert held[-1].getpeername()
    finally:
        for s in held:
            s.close()
    assert "gateway listener: closed idle or half-sent connections" in net.w1.log_text()
    assert net.w1.log_text().count("gateway listener: closed idle or half-sent") <= 2
