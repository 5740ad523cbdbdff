"""The rma-tunnel launcher (systemd/rma-tunnel), on the host, without systemd.

It turns agent.toml into cloudflared's command line; these tests pin that mapping, the
exit codes the unit relies on (ExecCondition=: 0 run / 1 skip / 255 fail;
RestartPreventExitStatus=78) and the messages an operator reads in the journal. The last
test execs the cloudflared STAND-IN (tests/tools/fake_cloudflared.py) for real and talks
to its metrics server on loopback.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.util import wait_for

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "systemd" / "rma-tunnel"
FAKE = REPO / "tests" / "tools" / "fake_cloudflared.py"


def toml(tmp_path: Path, *, tunnel: str, listen: str = "127.0.0.1:8080",
         gateway: str = "127.0.0.1:8090", metrics: str = "127.0.0.1:20241",
         hostname: str = "", role: str = "worker", extra: str = "") -> Path:
    worker = '[worker]\nservices = ["ocr"]\n' if role == "worker" else ""
    text = (f'[agent]\nrole = "{role}"\nname = "t"\nstate_dir = "{tmp_path}/state"\n'
            f'[http]\nlisten = "{listen}"\n[gateway]\nlisten = "{gateway}"\n{worker}'
            f'[tunnel]\nmode = "{tunnel}"\nmetrics = "{metrics}"\nhostname = "{hostname}"\n'
            f"{extra}")
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True,
                          text=True, env=full_env, timeout=30)


def fake_env() -> dict[str, str]:
    return {"RMA_CLOUDFLARED": str(FAKE)}


def test_quick_tunnel_command_line(tmp_path):
    cfg = toml(tmp_path, tunnel="quick", listen="127.0.0.1:8080", gateway="0.0.0.0:8091",
               metrics="127.0.0.1:20999")
    assert launch("-c", str(cfg), "--condition").returncode == 0
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 0, r.stderr
    # The origin is the gateway, never the admin API; a wildcard address is reached on
    # loopback.
    assert shlex.split(r.stdout) == [str(FAKE), "--no-autoupdate", "--metrics", "127.0.0.1:20999",
                                "tunnel", "--url", "http://127.0.0.1:8091"]
    assert "8080" not in r.stdout


def test_quick_tunnel_default_origin_is_the_default_gateway(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{tmp_path}/state"\n[worker]\nservices = ["ocr"]\n'
                   '[tunnel]\nmode = "quick"\n')
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout)[-2:] == ["--url", "http://127.0.0.1:8090"]


def test_quick_tunnel_ipv6_origin(tmp_path):
    cfg = toml(tmp_path, tunnel="quick", listen="[::1]:8080", gateway="[::]:8090")
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout)[-1] == "http://[::1]:8090"


def test_named_tunnel_uses_explicit_config_next_to_agent_toml(tmp_path):
    cfg = toml(tmp_path, tunnel="named", hostname="w1.example.org")
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 78
    assert "cloudflared.yml" in r.stderr
    (tmp_path / "cloudflared.yml").write_text("tunnel: x\ncredentials-file: /x.json\n")
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 0, r.stderr
    # An explicit --config: a stray /etc/cloudflared/config.yml cannot take over.
    # ... and the origin is the gateway here too (cloudflared's --url, not ingress rules).
    assert shlex.split(r.stdout)[-6:] == ["tunnel", "--config", str(tmp_path / "cloudflared.yml"),
                                     "run", "--url", "http://127.0.0.1:8090"]


def test_named_tunnel_refuses_ingress_rules(tmp_path):
    cfg = toml(tmp_path, tunnel="named", hostname="w1.example.org")
    (tmp_path / "cloudflared.yml").write_text(
        "tunnel: x\ncredentials-file: /x.json\ningress:\n  - service: http://127.0.0.1:8080\n")
    r = launch("-c", str(cfg), "--print", env=fake_env())
    assert r.returncode == 78
    assert "ingress rules" in r.stderr and "gateway.listen" in r.stderr


def test_mode_off_is_skipped_not_failed(tmp_path):
    cfg = toml(tmp_path, tunnel="off")
    r = launch("-c", str(cfg), "--condition")
    assert r.returncode == 1                       # ExecCondition=: skip the unit
    assert 'tunnel.mode = "off"' in r.stderr
    assert launch("-c", str(cfg)).returncode == 0  # run directly: nothing to do


def test_bad_config_fails_with_the_config_errors(tmp_path):
    cfg = toml(tmp_path, tunnel="sideways")
    r = launch("-c", str(cfg), "--condition")
    assert r.returncode == 255                     # ExecCondition=: a failure, not a skip
    assert "tunnel.mode" in r.stderr and "check-config" in r.stderr
    r = launch("-c", str(cfg))
    assert r.returncode == 78
    missing = launch("-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 78 and "nope.toml" in missing.stderr


def test_missing_cloudflared_is_reported_once(tmp_path):
    cfg = toml(tmp_path, tunnel="quick")
    r = launch("-c", str(cfg), env={"RMA_CLOUDFLARED": str(tmp_path / "no-such-binary"),
                                   "JOURNAL_STREAM": "8:1"})
    assert r.returncode == 78                      # RestartPreventExitStatus=78: no loop
    assert "cloudflared is not installed" in r.stderr
    assert r.stderr.startswith("<3>")              # journald priority "err"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.skipif(not FAKE.exists(), reason="cloudflared stand-in not present")
def test_launcher_execs_the_stand_in(tmp_path):
    """End to end on loopback: the launcher execs (same pid) the stand-in, whose metrics
    server then answers /ready and /quicktunnel at the address from agent.toml."""
    port = _free_port()
    cfg = toml(tmp_path, tunnel="quick", metrics=f"127.0.0.1:{port}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           **fake_env()}
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def quicktunnel() -> bytes | None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                code, body = _get(f"http://127.0.0.1:{port}/quicktunnel")
            except OSError:
                return None
            return body if code == 200 else None

        body = wait_for(quicktunnel, 15, 0.1, "the stand-in's metrics server (/quicktunnel)")
        assert json.loads(body)["hostname"].endswith(".trycloudflare.com")
        # no FAKE_CLOUDFLARED_READY_DELAY: its four edge connections are up at once
        code, ready = _get(f"http://127.0.0.1:{port}/ready")
        assert code == 200 and json.loads(ready)["readyConnections"] == 4, (code, ready)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--no-autoupdate" in cmdline and b"--url" in cmdline  # exec'd in place
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0  # the stand-in, like cloudflared, exits 0 on SIGTERM
