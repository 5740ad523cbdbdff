"""``rma-agent admit --issuer``, ``rma-agent token create|list|revoke`` and
``check-config``'s ``network.issuer_cert`` lines: the operator's side of enrollment."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import read_b64_file
from agent.admission.tokens import TokenStore
from agent.cli import main
from agent.dht.identity import Identity


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def net(tmp_path, capsys):
    """A network key, a coordinator config and its identity."""
    rc, out, _ = run(capsys, "network-key", "create", "-o", tmp_path / "nk.pem")
    assert rc == 0
    state = tmp_path / "state"
    ident = Identity.load_or_create(state)
    cfg = tmp_path / "coord.toml"
    cfg.write_text(f'[agent]\nrole = "coordinator"\nstate_dir = "{state}"\n'
                   f'[network]\nadmission_keys = ["{out.strip()}"]\n'
                   f'issuer_cert = "{tmp_path / "issuer.cert"}"\n')
    return tmp_path, cfg, ident, out.strip()


def test_admit_issuer(net, capsys):
    tmp, cfg, ident, nk_pub = net
    pk = base64.b64encode(ident.public_key).decode()
    rc, _, err = run(capsys, "admit", "--network-key", tmp / "nk.pem", "--public-key", pk,
                     "--issuer", "--services", "ocr,asr", "--max-cert-days", "3",
                     "--name", "coord-1", "-o", tmp / "issuer.cert")
    assert rc == 0, err
    assert "set network.issuer_cert" in err
    iss = IssuerCertificate.decode(read_b64_file(tmp / "issuer.cert", "issuer", 256))
    assert iss.subject == ident.public_key and iss.services == ("asr", "ocr")
    assert iss.max_cert_s == 3 * 86400 and iss.not_after - iss.not_before == 365 * 86400
    assert iss.signed_by(base64.b64decode(nk_pub))
    rc, _out, err = run(capsys, "check-config", "-c", cfg)
    assert rc == 0, err


@pytest.mark.parametrize("args,match", [
    (["--max-cert-days", "0"], "--max-cert-days"),
    (["--max-cert-days", "400"], "--max-cert-days"),
    (["--max-cert-days", "x"], "--max-cert-days"),
    (["--days", "2", "--max-cert-days", "7"], "longer than the issuer"),
    (["--name", "n" * 33], "--name"),
])
def test_admit_issuer_bad_input(net, capsys, args, match):
    tmp, _, ident, _ = net
    rc, _, err = run(capsys, "admit", "--network-key", tmp / "nk.pem", "--public-key",
                     base64.b64encode(ident.public_key).decode(), "--issuer", *args,
                     "-o", tmp / "x.cert")
    assert rc == 2 and match in err and not (tmp / "x.cert").exists()


def test_max_cert_days_needs_issuer(net, capsys):
    tmp, _, ident, _ = net
    rc, _, err = run(capsys, "admit", "--network-key", tmp / "nk.pem", "--public-key",
                     base64.b64encode(ident.public_key).decode(), "--max-cert-days", "3",
                     "-o", tmp / "x.cert")
    assert rc == 2 and "only goes with --issuer" in err


def test_check_config_names_issuer_problems(net, capsys):
    tmp, cfg, _ident, _ = net
    rc, _, err = run(capsys, "check-config", "-c", cfg)
    assert rc == 2 and ":6: network.issuer_cert: " in err and "no such file" in err
    other = Identity.generate()
    run(capsys, "admit", "--network-key", tmp / "nk.pem", "--public-key",
        base64.b64encode(other.public_key).decode(), "--issuer", "-o", tmp / "issuer.cert")
    rc, _, err = run(capsys, "check-config", "-c", cfg)
    assert rc == 2 and "network.issuer_cert" in err and "this box's key" in err
    worker = tmp / "worker.toml"
    worker.write_text('[agent]\nrole = "worker"\n[worker]\nservices = ["ocr"]\n'
                      '[network]\nissuer_cert = "x.cert"\n')
    rc, _, err = run(capsys, "check-config", "-c", worker)
    assert rc == 2 and f"{worker}:6: network.issuer_cert: only a coordinator" in err
    open_coord = tmp / "open.toml"
    open_coord.write_text('[agent]\nrole = "coordinator"\n[network]\nissuer_cert = "x.cert"\n')
    rc, _, err = run(capsys, "check-config", "-c", open_coord)
    assert rc == 2 and "needs a closed network" in err


def test_token_create_list_revoke(net, capsys):
    tmp, cfg, _, _ = net
    rc, out, err = run(capsys, "token", "create", "-c", cfg, "--services", "ocr",
                       "--uses", "50", "--expires", "7d", "--name", "batch-3")
    assert rc == 0, err
    secret = out.strip()
    assert secret.startswith("rmat_") and "\n" not in secret and "batch-3" in err
    assert secret not in Path(TokenStore(tmp / "state").path).read_text()
    rc, out, _ = run(capsys, "token", "list", "-c", cfg)
    assert rc == 0 and "batch-3" in out and "50/50" in out and "active" in out
    assert secret not in out
    rc, _, err = run(capsys, "token", "revoke", "-c", cfg, "batch-3")
    assert rc == 0 and "revoked" in err
    rc, out, _ = run(capsys, "token", "list", "-c", cfg, "--json")
    [t] = json.loads(out)
    assert (t["name"], t["state"], t["uses_left"]) == ("batch-3", "revoked", 50)
    assert "digest" not in t


@pytest.mark.parametrize("args,match", [
    (["create", "--uses", "0"], "--uses"), (["create", "--uses", "x"], "--uses"),
    (["create", "--expires", "forever"], "--expires"), (["create", "--name", "a b"], "--name"),
    (["create", "--services", "OCR!"], "bad service"), (["revoke", "nope"], "no token named"),
])
def test_token_bad_input(net, capsys, args, match):
    _, cfg, _, _ = net
    rc, _, err = run(capsys, "token", args[0], "-c", cfg, *args[1:])
    assert rc == 2 and match in err, err


def test_token_needs_a_coordinator(tmp_path, capsys):
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[agent]\nrole = "worker"\nstate_dir = "{tmp_path}"\n'
                   '[worker]\nservices = ["ocr"]\n')
    rc, _, err = run(capsys, "token", "create", "-c", cfg)
    assert rc == 2 and "coordinator" in err
