"""A closed network of real agents: only admitted workers are stored, registered and
offered; a revocation reaches every agent's answers within 2 minutes.

1 coordinator + 4 admitted workers + 1 without a certificate + 1 with an expired one +
1 whose certificate does not cover the service it announces, all DHT servers (so every
node is a storing node), all with the coordinator as fallback registry. Certificates and
the revocation list are made with the real CLI (``rma-agent identity`` / ``admit`` /
``revoke``) except the expired one, which ``admit`` cannot make.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from agent.admission import Certificate, NetworkKey
from agent.cli import main as cli_main
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from tests.cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.slow

ADMITTED = {"w1", "w2", "w3", "w4"}


def _cli(*argv: object) -> None:
    rc = cli_main([str(a) for a in argv])
    assert rc == 0, argv


def _names(node: Node, path: str) -> set[str] | None:
    status, body = node.get(path, timeout=5.0)
    if status != 200 or not isinstance(body, dict):
        return None
    items = body.get("workers", body.get("records"))
    return {w["name"] for w in items} if isinstance(items, list) else None


def _answers(cl: Cluster) -> dict[str, tuple[set[str] | None, set[str] | None]]:
    """Per agent: (discovery's ranked answer — cached as callers get it —, the raw DHT
    lookup)."""
    return cl.parallel(lambda n: (_names(n, "/api/services/ocr?limit=50"),
                                  _names(n, "/api/dht/providers/ocr")), cl.live())


def test_closed_network_admission_and_revocation(tmp_path: Path, monkeypatch) -> None:
    nk_path = tmp_path / "network.pem"
    _cli("network-key", "create", "-o", nk_path)
    nk = NetworkKey.load(nk_path)
    pub = base64.b64encode(nk.public_key).decode()
    # the production interval is 60 s; 20 s keeps the test short and still measures
    # the real fetch -> purge -> answer path
    monkeypatch.setenv("RMA_AGENT_REVOCATION_INTERVAL", "20")
    with Cluster(tmp_path, record_ttl=20, republish=3) as cl:
        net = {"network": {"admission_keys": [pub]}}
        c1 = cl.coordinator("c1", extra=net)
        cl.start(c1)
        cl.wait_ready(c1)
        coord = [c1.url]
        workers: dict[str, Node] = {}
        for name in [*sorted(ADMITTED), "nocert", "expired", "wrongsvc"]:
            w = cl.worker(name, seeds=[c1.dht_addr], services=["ocr"], mode="server",
                          coordinators=coord, extra=net)
            workers[name] = w
            ident = Identity.load_or_create(w.state_dir)     # what `run` will load
            cert = tmp_path / f"{name}.cert"
            b64 = base64.b64encode(ident.public_key).decode()
            if name in ADMITTED:
                _cli("identity", "-c", w.cfg_path)
                _cli("admit", "--network-key", nk_path, "--public-key", b64, "--name", name,
                     "--services", "ocr,asr", "--days", "30", "-o", cert)
            elif name == "expired":
                c = Certificate.issue(nk, ident.public_key, name=name, services=("ocr",),
                                      days=1, now=time.time() - 2 * 86400)
                cert.write_bytes(base64.b64encode(c.encode()) + b"\n")
            elif name == "wrongsvc":
                _cli("admit", "--network-key", nk_path, "--public-key", b64, "--services",
                     "asr", "-o", cert)
            if name != "nocert":
                w.data["worker"]["admission_cert"] = str(cert)
        cl.start(*workers.values())
        cl.wait_ready(*(workers[n] for n in sorted(ADMITTED)))
        cl.wait_healthy(*(workers[n] for n in ("nocert", "expired", "wrongsvc")))

        # the refused workers say why, and are not ready
        for name, why in (("nocert", "not set"), ("expired", "expired"),
                          ("wrongsvc", "does not cover ocr")):
            status, body = workers[name].get("/readyz")
            assert status == 503 and why in str(body), (name, status, body)

        # every agent's answers hold exactly the 4 admitted workers
        def settled() -> bool:
            ans = _answers(cl)
            return all(a == (ADMITTED, ADMITTED) for a in ans.values()), ans
        wait_until(lambda: settled()[0], 40, "every agent answers with the 4 admitted",
                   interval=1.0)

        # refusals happened where they should: the storing nodes and the registry
        _, stats = c1.get("/api/dht/stats")
        assert stats["network"]["closed"] is True
        assert stats["coordinator"]["rejected"] >= 1, stats["coordinator"]
        refused = stats["network"]["refused"]
        assert any("no admission certificate" in k for k in refused), refused
        status, reg = c1.get("/api/registry/ocr")
        assert status == 200
        assert {WorkerRecord.decode(base64.b64decode(r)).name for r in reg["records"]} \
            <= ADMITTED

        # revoke w2 with the real CLI, put the list where the coordinator reads it
        w2_key = base64.b64encode(Identity.load_or_create(workers["w2"].state_dir)
                                  .public_key).decode()
        rev = tmp_path / "revocations.list"
        _cli("revoke", "--network-key", nk_path, "--public-key", w2_key, "-o", rev)
        t0 = time.monotonic()
        (c1.state_dir / "revocations.list").write_bytes(rev.read_bytes())
        remaining = ADMITTED - {"w2"}

        last: dict = {}

        def revoked_everywhere() -> bool:
            last["ans"] = _answers(cl)
            return all(a == (remaining, remaining) for a in last["ans"].values())
        wait_until(revoked_everywhere, 120, "every agent drops the revoked worker",
                   interval=1.0)
        took = time.monotonic() - t0
        print(f"revocation reached every agent's answers in {took:.1f} s "
              f"(fetch interval 20 s)")
        assert took < 120
        # and it stays gone while w2 keeps republishing
        time.sleep(4)
        ans = _answers(cl)
        assert all(a == (remaining, remaining) for a in ans.values()), ans
        _, stats = workers["w1"].get("/api/dht/stats")
        assert stats["network"]["revoked"] == 1
