"""The appliance routes a request through the tunnel to the service a worker fronts.

On a booted Debian (systemd-nspawn, see conftest.py) with the .deb installed: a real
upstream (``python3 -m http.server`` as a transient unit), the packaged agent as a worker
with ``[gateway.upstreams]`` and ``tunnel.mode = "quick"``, and ``rma-tunnel.service``
running the cloudflared STAND-IN (tests/tools/fake_cloudflared.py; the real cloudflared
cannot be downloaded here). The stand-in's local "edge" relays a request for the quick
tunnel's host name to its origin: the request must reach the upstream through the
worker's gateway, under systemd's sandboxing, while the admin API stays unreachable
through the tunnel and the ownership proof signs the tunnel's URL.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from agent.proof import PROOF_PATH, new_nonce, verify_proof

# its tests share one container and run in file order on it: tests/conftest.py keeps
# every appliance test on one pytest-xdist worker (group "appliance")
pytestmark = [pytest.mark.slow, pytest.mark.nspawn]

UNIT = "rma-agent.service"
TUNNEL = "rma-tunnel.service"
CONF = "/etc/rma-agent/agent.toml"
API = "http://127.0.0.1:8080"
METRICS = "127.0.0.1:20241"
EDGE = "127.0.0.1:8443"

WORKER_TOML = """\
[agent]
role = "worker"
name = "gw-worker"
region = "test"
state_dir = "/var/lib/rma-agent"

[dht]
listen = "127.0.0.1:8468"
bootstrap = []
mode = "server"

[http]
listen = "127.0.0.1:8080"

[gateway]
listen = "127.0.0.1:8090"
max_body_mb = 10

[gateway.upstreams]
files = { url = "http://127.0.0.1:9000", health = "/hello.txt" }

[worker]
services = ["files"]
endpoint = ""
max_concurrency = 4

[tunnel]
mode = "quick"
metrics = "127.0.0.1:20241"

[log]
level = "info"
"""


@pytest.fixture(scope="module")
def installed(container, deb):
    r = container.run("apt-get", "install", "-y", "--no-install-recommends",
                      f"/srv/pkg/{deb.name}", timeout=180, check=False)
    assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return container


def _edge(c, path: str, host: str, *extra: str) -> tuple[int, str]:
    """A request to the stand-in's edge for ``host`` (what a caller on the internet sends
    to https://<host>), from inside the container."""
    r = c.run("curl", "-s", "-m", "10", "-H", f"Host: {host}", *extra, "-o", "/dev/stdout",
              "-w", "\n%{http_code}", f"http://{EDGE}{path}", check=False, timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_request_through_the_tunnel_reaches_the_upstream(installed):
    c = installed
    c.sh("mkdir -p /srv/www && printf 'hello through the gateway\\n' > /srv/www/hello.txt"
         " && head -c 11000000 /dev/zero > /srv/big.bin")
    c.run("systemctl", "stop", "upstream.service", check=False)
    c.run("systemctl", "reset-failed", "upstream.service", check=False)
    c.run("systemd-run", "--unit=upstream", "-p", "DynamicUser=yes", "python3", "-m",
          "http.server", "9000", "--bind", "127.0.0.1", "--directory", "/srv/www")
    c.write("/etc/default/rma-agent", "RMA_CLOUDFLARED=/srv/tools/fake_cloudflared.py\n"
                                      f"FAKE_CLOUDFLARED_EDGE={EDGE}\n")
    c.write(CONF, WORKER_TOML)
    try:
        c.run("systemctl", "reset-failed", TUNNEL, check=False)
        c.run("systemctl", "restart", UNIT, timeout=60)
        c.wait_for("rma-tunnel active", lambda: c.show(TUNNEL, "ActiveState") == "active",
                   timeout=20)
        # the launcher made the gateway cloudflared's origin, not the admin API
        code, body = c.wait_for("stand-in edge", lambda: (lambda r: r if r[0] == 200 else None)(
            c.curl(f"http://{METRICS}/fake/edge")), timeout=20)
        edge = json.loads(body)
        assert edge["origin"] == "http://127.0.0.1:8090", edge
        host = edge["hostname"]
        public = f"https://{host}"
        stats = c.wait_for("endpoint learned from the tunnel", lambda: (
            lambda s: s if s.get("worker", {}).get("endpoint") == public else None)(
            json.loads(c.curl(f"{API}/api/dht/stats")[1])), timeout=30)
        assert stats["gateway"]["upstreams"]["files"]["state"] == "up", stats["gateway"]

        code, body = _edge(c, "/files/hello.txt", host)
        assert (code, body) == (200, "hello through the gateway\n")
        code, body = _edge(c, "/files/missing.txt", host)
        assert code == 404                              # the upstream's own 404
        code, body = _edge(c, "/files/hello.txt", host, "--data-binary", "@/srv/big.bin")
        assert code == 413 and "gateway.max_body_mb" in body, (code, body[:300])

        nonce = new_nonce()
        code, body = _edge(c, f"{PROOF_PATH}?nonce={nonce}", host)
        assert code == 200, body
        proof = json.loads(body)
        key = base64.b64decode(proof["public_key"])
        assert hashlib.sha1(key).hexdigest() == stats["node_id"]
        verify_proof(proof, public_key=key, nonce=bytes.fromhex(nonce), endpoint=public)

        for path in ("/api/dht/stats", "/healthz", "/metrics", "/api/services/files"):
            code, body = _edge(c, path, host)
            assert code == 404 and "error" in json.loads(body), (path, code, body)
        # the admin API still answers locally
        assert c.curl(f"{API}/healthz")[0] == 200
    finally:
        c.run("systemctl", "stop", "upstream.service", check=False)
        c.write("/etc/default/rma-agent", "")
