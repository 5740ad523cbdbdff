"""NetworkComponent: certificate checks, check-config, revocation lists served, fetched
and kept; and a closed network of real agents: only admitted workers are stored,
registered and offered; a revocation reaches every agent's answers within 2 minutes.

The cluster: 1 coordinator + 4 admitted workers + 1 without a certificate + 1 with an expired one +
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

from agent.admission.certificate import Certificate
from agent.admission.component import NetworkComponent
from agent.admission.keys import NetworkKey
from agent.admission.revocation import RevocationList
from agent.cli import main as cli_main
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from tests.cluster import Cluster, Node, wait_until

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


@pytest.mark.slow
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
        coord = [c1.gateway_url]       # the public listener, as in production
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
        # and it stays gone while w2 keeps republishing (two more announces of its own)
        done = workers["w2"].get("/api/dht/stats")[1]["worker"]["announces"]
        wait_until(lambda: workers["w2"].get("/api/dht/stats")[1]["worker"]["announces"]
                   >= done + 2, 30, "w2 republishes twice after its revocation")
        ans = _answers(cl)
        assert all(a == (remaining, remaining) for a in ans.values()), ans
        _, stats = workers["w1"].get("/api/dht/stats")
        assert stats["network"]["revoked"] == 1

        # an admitted worker's withdrawal (a tombstone carrying its certificate) is
        # stored and honoured: DHT lookups everywhere drop it at once
        assert cl.stop(workers["w4"]) == 0
        wait_until(lambda: all(_names(n, "/api/dht/providers/ocr") == {"w1", "w3"}
                               for n in cl.live()), 15, "w4's withdrawal everywhere",
                   interval=0.5)


# ----------------------------------------------------------------------------- in process
NK = NetworkKey.generate()
NK_B64 = base64.b64encode(NK.public_key).decode()


def _write_cfg(tmp: Path, *, cert: str | None, keys: tuple[str, ...] = (NK_B64,),
               services: str = '"ocr"', sources: bool = True) -> Path:
    cfg = tmp / "agent.toml"
    lines = ['[agent]', 'role = "worker"', f'state_dir = "{tmp / "state"}"',
             '[worker]', f'services = [{services}]']
    if cert is not None:
        lines.append(f'admission_cert = "{cert}"')
    if sources:
        lines += ['[discovery]', 'coordinators = ["http://127.0.0.1:9"]']
    lines += ['[network]', f'admission_keys = {list(keys)!r}'.replace("'", '"')]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _cert_file(tmp: Path, ident: Identity, name: str = "box.cert", **kw) -> Path:
    c = Certificate.issue(NK, ident.public_key, **kw)
    path = tmp / name
    path.write_bytes(base64.b64encode(c.encode()) + b"\n")
    return path


def _check(capsys, cfg: Path) -> tuple[int, str]:
    rc = cli_main(["check-config", "-c", str(cfg)])
    return rc, capsys.readouterr().err


def test_check_config_certificate_problems(tmp_path: Path, capsys) -> None:
    ident = Identity.load_or_create(tmp_path / "state")
    other = Identity.generate()
    good = _cert_file(tmp_path, ident, services=("ocr",))
    cases = [
        (None, "not set, but network.admission_keys makes this a closed network"),
        (str(tmp_path / "missing.cert"), "no such file"),
        (str(_cert_file(tmp_path, other, "other.cert")), "certificate is for another key"),
        (str(_cert_file(tmp_path, ident, "asr.cert", services=("asr",))),
         "does not cover ocr"),
        (str(_cert_file(tmp_path, ident, "old.cert", days=1, now=time.time() - 3 * 86400)),
         "certificate expired"),
    ]
    junk = tmp_path / "junk.cert"
    junk.write_text("not a certificate\n")
    cases.append((str(junk), "not a base64 certificate"))
    for cert, needle in cases:
        cfg = _write_cfg(tmp_path, cert=cert)
        rc, err = _check(capsys, cfg)
        assert rc == 2, (cert, err)
        assert f"{cfg}:" in err and "worker.admission_cert: " in err and needle in err, err
        assert len(err.strip().splitlines()) == 1, err
    # a foreign admission key: the certificate is not from this network
    cfg = _write_cfg(tmp_path, cert=str(good),
                     keys=(base64.b64encode(NetworkKey.generate().public_key).decode(),))
    rc, err = _check(capsys, cfg)
    assert rc == 2 and "does not list" in err
    # good: exit 0, silent on stderr; expiring within 7 days: a warning, still exit 0
    rc, err = _check(capsys, _write_cfg(tmp_path, cert=str(good)))
    assert rc == 0 and err == ""
    soon = _cert_file(tmp_path, ident, "soon.cert", services=("ocr",), days=3)
    rc, err = _check(capsys, _write_cfg(tmp_path, cert=str(soon)))
    assert rc == 0 and "warning: " in err and "expires in 3.0 days" in err
    # closed, but nowhere to fetch revocation lists from: a warning naming the key
    cfg = _write_cfg(tmp_path, cert=str(good), sources=False)
    rc, err = _check(capsys, cfg)
    assert rc == 0 and "network.admission_keys: warning: " in err
    assert "discovery.coordinators" in err and len(err.strip().splitlines()) == 1
    # an open network does not need one: problems are only warnings
    rc, err = _check(capsys, _write_cfg(tmp_path, cert=str(tmp_path / "missing.cert"), keys=()))
    assert rc == 0 and "warning: " in err and "no such file" in err


def _agent(cfg_path: Path):
    from agent.config import load_config
    from tests.roles.fakes import FakeAgent, FakeDHT

    cfg = load_config(cfg_path)
    agent = FakeAgent(cfg, FakeDHT(Identity.load_or_create(cfg.agent.state_dir)))
    agent.http_url = ""
    comp = NetworkComponent(agent)  # type: ignore[arg-type]
    agent.components.append(comp)
    return agent, comp


async def test_worker_status_and_stats(tmp_path: Path, caplog) -> None:
    ident = Identity.load_or_create(tmp_path / "state")
    _, comp = _agent(_write_cfg(tmp_path, cert=None))
    await comp.start()
    try:
        assert comp.ready()[0] is False and "admission:" in comp.ready()[1]
        assert comp.status() == "NOT ADMITTED (see worker.admission_cert)"
        assert comp.certificate_blob() == b""
        st = comp.stats()["network"]
        assert st["closed"] is True and st["certificate"]["carried"] is False
    finally:
        await comp.stop()
    soon = _cert_file(tmp_path, ident, services=("ocr",), days=2)
    _, comp = _agent(_write_cfg(tmp_path, cert=str(soon)))
    await comp.start()
    try:
        assert comp.ready() == (True, "")
        assert comp.status().startswith("admission cert EXPIRES in 1.9") \
            or comp.status().startswith("admission cert EXPIRES in 2.0"), comp.status()
        assert Certificate.decode(comp.certificate_blob()).subject == ident.public_key
    finally:
        await comp.stop()
    caplog.clear()
    _, comp = _agent(_write_cfg(tmp_path, cert=None, keys=()))
    with caplog.at_level("INFO", logger="rma_agent.network"):
        await comp.start()
    await comp.stop()
    assert comp.stats()["network"]["closed"] is False and comp.status() == ""
    assert sum("network: open" in r.getMessage() for r in caplog.records) == 1


async def test_lists_fetched_over_http_and_kept(tmp_path: Path) -> None:
    """One agent serves its operator's list file; another fetches it over real HTTP,
    keeps it across a restart, and ignores a list signed by a key it does not trust."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    revoked = Identity.generate()
    _, server = _agent(_write_cfg(tmp_path / "a", cert=None))
    rl = RevocationList.issue(NK, [revoked.public_key])
    (tmp_path / "a" / "state" / "revocations.list").write_bytes(
        base64.b64encode(rl.encode()) + b"\n")
    assert server._check_local_file() and server.policy.revoked == {revoked.public_key}
    app = web.Application()
    server.add_routes(app)
    ts = TestServer(app, host="127.0.0.1")
    await ts.start_server()
    try:
        cfg_b = _write_cfg(tmp_path / "b", cert=None)
        cfg_b.write_text(cfg_b.read_text().replace(
            "http://127.0.0.1:9", f"http://127.0.0.1:{ts.port}"))
        _, client = _agent(cfg_b)
        assert await client.refresh() is True
        assert client.policy.revoked == {revoked.public_key}
        assert await client.refresh() is False           # nothing new the second time
        assert client.stats()["network"]["fetches"]["ok"] == 2
        await client.stop()
        _, restarted = _agent(cfg_b)                     # no fetch: from revocations.known
        assert restarted.policy.revoked == {revoked.public_key}
    finally:
        await ts.close()
    # a list from an untrusted key in the operator's file is refused, loudly
    stranger = NetworkKey.generate()
    (tmp_path / "c" / "state").mkdir(parents=True)
    (tmp_path / "c" / "state" / "revocations.list").write_bytes(
        base64.b64encode(RevocationList.issue(stranger, [Identity.generate().public_key])
                         .encode()) + b"\n")
    _, fresh = _agent(_write_cfg(tmp_path / "c", cert=None))
    assert not fresh.policy.lists and fresh._local_mtime is not None   # read, refused


async def test_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    agent, comp = _agent(_write_cfg(tmp_path, cert=None))
    comp.check(type("R", (), {"public_key": bytes(32), "services": ("ocr",), "cert": b"",
                              "withdrawn": False})())
    text = generate_latest(agent.registry).decode()
    assert "rma_agent_network_closed 1.0" in text
    assert 'rma_agent_network_refused_total{reason="no admission certificate"} 1.0' in text
