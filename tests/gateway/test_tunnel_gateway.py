"""The tunnel publishes the gateway: a real agent, the real ``rma-tunnel`` launcher, the
cloudflared STAND-IN (tests/tools/fake_cloudflared.py — the real cloudflared cannot be
downloaded here) and a real upstream. A request sent to the stand-in's edge with the quick
tunnel's public host name reaches the upstream through the worker's gateway, the proof
fetched the same way verifies for ``https://<hostname>`` against the announced record,
and the admin API is not reachable through the tunnel at all."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.proof import PROOF_PATH, new_nonce, verify_proof
from tests.cluster import REPO, Cluster, http, wait_until
from tests.gateway.upstream import Upstream
from tests.util import free_port

pytestmark = pytest.mark.slow

LAUNCHER = REPO / "systemd" / "rma-tunnel"
FAKE = REPO / "tests" / "tools" / "fake_cloudflared.py"


def _edge(url: str, host: str, method: str = "GET",
          data: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, data=data, method=method, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_request_through_the_tunnel_stand_in_reaches_the_upstream(tmp_path: Path) -> None:
    up = Upstream().start()
    try:
        with Cluster(tmp_path, record_ttl=20, republish=3) as cl:
            c1 = cl.coordinator("c1")
            cl.start(c1)
            cl.wait_ready(c1)
            w = cl.worker("tw", [c1.dht_addr], services=["echo"], extra={
                "gateway": {"upstreams": {"echo": up.url}}})
            metrics = f"{w.ip}:{free_port(host=w.ip)}"
            w.data["worker"]["endpoint"] = ""                  # learned from the tunnel
            w.data["tunnel"] = {"mode": "quick", "metrics": metrics}
            w.write_config()
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
                   "RMA_CLOUDFLARED": str(FAKE), "FAKE_CLOUDFLARED_EDGE": f"{w.ip}:0"}
            tunnel = subprocess.Popen([sys.executable, str(LAUNCHER), "-c", str(w.cfg_path)],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=(tmp_path / "tunnel.log").open("wb"))
            try:
                cl.start(w)
                cl.wait_ready(w)
                _, edge = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
                    http("GET", f"http://{metrics}/fake/edge")), 10, "stand-in edge")
                # the launcher gave cloudflared the gateway as origin, not the admin API
                assert edge["origin"] == w.gateway_url and edge["origin"] != w.url
                public = f"https://{edge['hostname']}"
                wait_until(lambda: w.get("/api/dht/stats")[1]["worker"]["endpoint"] == public,
                           15, "endpoint learned from the tunnel")
                recs = wait_until(lambda: [r for r in c1.provider_records("echo")[0]
                                           if r["endpoint"] == public], 15, "announced")
                host = edge["hostname"]

                status, _, body = _edge(f"{edge['url']}/echo/echo/doc?page=2", host,
                                        "POST", b"\x00\xffpayload")
                assert status == 200, body
                assert body["path"] == "/echo/doc?page=2" and body["length"] == 9
                seen = {k.lower(): v for k, v in body["headers"]}
                assert seen["x-forwarded-proto"] == "https"
                assert seen["forwarded"].endswith(f'host="{host}"')
                assert seen["x-forwarded-for"].count(",") == 1    # edge peer, then stand-in

                nonce = new_nonce()
                status, _, proof = _edge(f"{edge['url']}{PROOF_PATH}?nonce={nonce}", host)
                assert status == 200 and proof["endpoint"] == public
                key = base64.b64decode(proof["public_key"])
                assert hashlib.sha1(key).hexdigest() == recs[0]["id"]
                verify_proof(proof, public_key=key, nonce=bytes.fromhex(nonce), endpoint=public)

                for path in ("/api/dht/stats", "/healthz", "/api/services/echo", "/metrics"):
                    status, _, body = _edge(edge["url"] + path, host)
                    assert status == 404 and "error" in body, (path, body)
            finally:
                tunnel.send_signal(signal.SIGTERM)
                try:
                    tunnel.wait(10)
                except subprocess.TimeoutExpired:
                    tunnel.kill()
                    tunnel.wait()
    finally:
        up.stop()
