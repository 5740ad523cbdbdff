"""``rma-agent identity`` / ``network-key create`` / ``admit`` / ``revoke``: the closed-network
workflow end to end, and every bad input exits 2 with one clear line."""

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.admission.certificate import Certificate
from agent.admission.keys import read_b64_file
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.cli import main
from agent.dht.identity import Identity
from tests.util import requires

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:          # argparse usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def setup(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nrole = "worker"\nstate_dir = "{tmp_path / "state"}"\n'
                   '[worker]\nservices = ["ocr"]\n')
    rc, out, _ = run(capsys, "network-key", "create", "-o", tmp_path / "nk.pem")
    assert rc == 0
    network_pub = out.strip()
    rc, out, err = run(capsys, "identity", "-c", cfg)
    assert rc == 0 and "created a new identity" in err
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    return tmp_path, cfg, network_pub, lines["public_key"], lines["node_id"]


def test_workflow(setup, capsys):
    tmp, cfg, network_pub, worker_pub, node_id = setup
    nk = tmp / "nk.pem"
    assert stat.S_IMODE(nk.stat().st_mode) == 0o600
    assert len(base64.b64decode(network_pub)) == 32
    # identity is stable and matches the key the agent will use
    rc, out, err = run(capsys, "identity", "-c", cfg)
    assert rc == 0 and err == "" and worker_pub in out and node_id in out
    ident = Identity.load_or_create(tmp / "state")
    assert base64.b64encode(ident.public_key).decode() == worker_pub
    assert ident.node_id.hex() == node_id
    # admit
    rc, _, err = run(capsys, "admit", "--network-key", nk, "--public-key", worker_pub,
                     "--name", "box-1", "--services", "OCR,llm-inference", "--days", "7",
                     "-o", tmp / "box.cert")
    assert rc == 0, err
    c = Certificate.decode(read_b64_file(tmp / "box.cert", "certificate", 256))
    assert c.services == ("llm-inference", "ocr") and c.name == "box-1"
    policy = AdmissionPolicy([base64.b64decode(network_pub)])
    assert policy.check_cert(c.encode(), ident.public_key, ["ocr"]) is None
    # revoke, then extend the same list in place
    other = base64.b64encode(Identity.generate().public_key).decode()
    rc, _, err = run(capsys, "revoke", "--network-key", nk, "--public-key", worker_pub,
                     "-o", tmp / "rev.list")
    assert rc == 0, err
    rc, _, err = run(capsys, "revoke", "--network-key", nk, "--public-key", other,
                     "--list", tmp / "rev.list", "-o", tmp / "rev.list")
    assert rc == 0, err
    rl = RevocationList.decode(read_b64_file(tmp / "rev.list", "revocation list", 10**6))
    assert len(rl.revoked) == 2
    assert policy.add_list(rl)
    assert policy.check_cert(c.encode(), ident.public_key, ["ocr"]) == "worker revoked"
    # a mistake is undone by a newer list without the key
    rc, _, err = run(capsys, "revoke", "--network-key", nk, "--unrevoke", worker_pub,
                     "--list", tmp / "rev.list", "-o", tmp / "rev.list")
    assert rc == 0, err
    rl2 = RevocationList.decode(read_b64_file(tmp / "rev.list", "revocation list", 10**6))
    assert rl2.seq > rl.seq and len(rl2.revoked) == 1
    assert policy.add_list(rl2)
    assert policy.check_cert(c.encode(), ident.public_key, ["ocr"]) is None


def _bad_cases(tmp: Path, worker_pub: str):
    nk = str(tmp / "nk.pem")
    admit = ["admit", "--network-key", nk, "--public-key", worker_pub]
    (tmp / "exists.cert").write_text("x")
    (tmp / "nk-open.pem").write_bytes((tmp / "nk.pem").read_bytes())
    os.chmod(tmp / "nk-open.pem", 0o644)
    return [
        (["network-key", "create", "-o", nk], "already exists"),
        (["network-key", "create", "-o", str(tmp / "no" / "dir" / "k.pem")], "no such directory"),
        ([*admit, "-o", str(tmp / "exists.cert")], "already exists"),
        ([*admit, "--days", "0", "-o", str(tmp / "c")], "--days must be more than 0"),
        ([*admit, "--days", "-3", "-o", str(tmp / "c")], "--days must be more than 0"),
        ([*admit, "--days", "soon", "-o", str(tmp / "c")], "--days must be a number"),
        ([*admit, "--services", "ocr,o cr", "-o", str(tmp / "c")], "bad service name"),
        ([*admit, "--services", "ocr,ocr", "-o", str(tmp / "c")], "listed twice"),
        ([*admit, "--name", "x" * 65, "-o", str(tmp / "c")], "--name"),
        (["admit", "--network-key", nk, "--public-key", "not base64!", "-o", str(tmp / "c")],
         "not valid base64"),
        (["admit", "--network-key", nk, "--public-key", "AAAA", "-o", str(tmp / "c")],
         "32 bytes"),
        (["admit", "--network-key", str(tmp / "missing.pem"), "--public-key", worker_pub,
          "-o", str(tmp / "c")], "no such file"),
        (["admit", "--network-key", str(tmp / "nk-open.pem"), "--public-key", worker_pub,
          "-o", str(tmp / "c")], "chmod 600"),
        (["admit", "--network-key", str(tmp / "state" / "identity.key"), "--public-key",
          worker_pub, "-o", str(tmp / "c")], "not a network key"),
        (["revoke", "--network-key", nk, "--public-key", worker_pub, "--list",
          str(tmp / "exists.cert"), "-o", str(tmp / "r")], "not a base64 revocation list"),
        (["revoke", "--network-key", nk, "--public-key", "AAAA", "-o", str(tmp / "r")],
         "32 bytes"),
        (["admit", "--public-key", worker_pub, "-o", str(tmp / "c")], "--network-key"),
        (["revoke", "--network-key", nk, "-o", str(tmp / "r")], "at least one --public-key"),
        (["revoke", "--network-key", nk, "--unrevoke", worker_pub, "-o", str(tmp / "r")],
         "needs the current list"),
    ]


def test_bad_inputs_exit_2_with_one_line(setup, capsys):
    tmp, _, _, worker_pub, _ = setup
    for argv, needle in _bad_cases(tmp, worker_pub):
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, rc, out, err)
        last = err.strip().splitlines()[-1]
        assert needle in last, (argv, err)
        assert "Traceback" not in err
        if not argv[1:2] == ["--public-key"]:       # argparse adds its usage line
            assert len(err.strip().splitlines()) == 1 or "usage:" in err, err
    assert not (tmp / "c").exists() and not (tmp / "r").exists()


def test_identity_bad_inputs(tmp_path, capsys):
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nrole = "coordinator"\nstate_dir = "{state}"\n')
    Identity.load_or_create(state)
    os.chmod(state / "identity.key", 0o644)
    rc, _, err = run(capsys, "identity", "-c", cfg)
    assert rc == 2 and "chmod 600" in err and len(err.strip().splitlines()) == 1
    (state / "identity.key").write_bytes(b"short")
    os.chmod(state / "identity.key", 0o600)
    rc, _, err = run(capsys, "identity", "-c", cfg)
    assert rc == 2 and "32-byte" in err
    cfg.write_text("[agent]\nbogus = 1\n")
    rc, _, err = run(capsys, "identity", "-c", cfg)
    assert rc == 2 and "agent.bogus" in err


def test_real_command_exit_codes(setup):
    """The installed entry point (python -m agent) gives the same exit codes."""
    tmp, _, _, worker_pub, _ = setup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "agent", "admit", "--network-key",
                          str(tmp / "nk.pem"), "--public-key", worker_pub, "--days", "0",
                          "-o", str(tmp / "c")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip() == "rma-agent admit: --days must be more than 0 and at most " \
                                 "3650, got 0"
    res = subprocess.run([sys.executable, "-m", "agent", "admit", "--network-key",
                          str(tmp / "nk.pem"), "--public-key", worker_pub, "-o",
                          str(tmp / "ok.cert")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr


@requires(None if os.geteuid() == 0 else "needs root (chown to the state dir's owner)")
def test_identity_as_root_hands_the_new_key_to_the_state_dir_owner(tmp_path, capsys):
    """``sudo rma-agent identity`` before the first start must not leave a root-owned key
    the service user cannot read."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nrole = "coordinator"\nstate_dir = "{state}"\n')
    rc, out, _ = run(capsys, "identity", "-c", cfg)
    assert rc == 0 and "public_key: " in out
    st = (state / "identity.key").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
