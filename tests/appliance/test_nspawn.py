"""The appliance, as a user gets it: the .deb installed on a booted Debian 12 (systemd 252).

One container per module (booted with systemd-nspawn, see conftest.py); the tests run in
file order on it, like an operator would: install -> default config -> coordinator ->
reload -> a second agent joins -> tunnel (stand-in) -> watchdog -> security -> purge.
Every test writes the configuration it needs, so a failure in one does not cascade into
the next beyond the shared container.

The cloudflared used here is ``tests/tools/fake_cloudflared.py``, a STAND-IN that imitates
cloudflared's command line and metrics server (/ready, /quicktunnel); it opens no tunnel.
"""

from __future__ import annotations

import json
import re
import time

import pytest

# its tests share one container and run in file order on it: tests/conftest.py keeps
# every appliance test on one pytest-xdist worker (group "appliance")
pytestmark = [pytest.mark.slow, pytest.mark.nspawn]

UNIT = "rma-agent.service"
TUNNEL = "rma-tunnel.service"
CONF = "/etc/rma-agent/agent.toml"
API = "http://127.0.0.1:8080"

COORDINATOR_TOML = """\
[agent]
role = "coordinator"
name = "coord-test"
region = "test"
state_dir = "/var/lib/rma-agent"

[dht]
listen = "127.0.0.1:8468"
bootstrap = []
mode = "server"

[http]
listen = "127.0.0.1:8080"

[gateway]
listen = "127.0.0.1:8092"

[tunnel]
mode = "off"

[discovery]
allow_private_hosts = ["127.0.0.1"]

[log]
level = "info"
"""


def worker_toml(*, name: str, dht_port: int, http_port: int, seeds: list[str], service: str,
                endpoint: str = "", tunnel: str = "off", state_dir: str = "/var/lib/rma-agent",
                metrics: str = "127.0.0.1:20241", gateway: str = "127.0.0.1:8090") -> str:
    return f"""\
[agent]
role = "worker"
name = "{name}"
region = "test"
state_dir = "{state_dir}"

[dht]
listen = "127.0.0.1:{dht_port}"
bootstrap = {json.dumps(seeds)}
mode = "server"
record_ttl = 60
republish_interval = 5

[http]
listen = "127.0.0.1:{http_port}"

[gateway]
listen = "{gateway}"

[worker]
services = ["{service}"]
endpoint = "{endpoint}"

[tunnel]
mode = "{tunnel}"
metrics = "{metrics}"

[discovery]
allow_private_hosts = ["127.0.0.1"]

[log]
level = "info"
"""


def messages(entries: list[dict]) -> list[str]:
    out = []
    for e in entries:
        m = e.get("MESSAGE", "")
        if isinstance(m, list):  # journald gives non-UTF-8 messages as byte lists
            m = bytes(m).decode(errors="replace")
        out.append(m)
    return out


def restart_and_wait_active(c, unit: str = UNIT, timeout: float = 60.0) -> None:
    """`systemctl restart` returns only once READY=1 arrived (Type=notify)."""
    c.run("systemctl", "restart", unit, timeout=timeout)
    assert c.show(unit, "ActiveState") == "active", c.run(
        "systemctl", "status", unit, "--no-pager", check=False).stdout


def agent_stats(c, base: str = API) -> dict:
    code, body = c.curl(f"{base}/api/dht/stats")
    assert code == 200, (code, body)
    return json.loads(body)


@pytest.fixture(scope="module")
def installed(container, deb):
    """`apt-get install ./rma-agent_*.deb` from the read-only bind mount, offline: every
    Depends must already be in the minimal root filesystem (packaging/rootfs.sh)."""
    r = container.run("apt-get", "install", "-y", "--no-install-recommends",
                      f"/srv/pkg/{deb.name}", timeout=180, check=False)
    assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return container


def test_install_enables_units_and_creates_user(installed):
    c = installed
    assert c.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    # rma-tunnel starts with the agent (WantedBy=rma-agent.service).
    assert c.run("systemctl", "is-enabled", TUNNEL).stdout.strip() == "enabled"
    pw = c.run("getent", "passwd", "rma-agent").stdout.strip().split(":")
    assert pw[5] == "/var/lib/rma-agent" and pw[6] == "/usr/sbin/nologin", pw
    assert int(pw[2]) < 1000, "rma-agent must be a system user"
    assert c.sh("stat -c '%a %U %G' /var/lib/rma-agent").strip() == "700 rma-agent rma-agent"
    assert c.sh("stat -c '%a %U' /etc/rma-agent/agent.toml").strip() == "644 root"
    assert "/etc/rma-agent/agent.toml" in c.read("/var/lib/dpkg/info/rma-agent.conffiles")
    # The venv runs on bookworm's own python3.11, with the compiled kernels.
    assert c.run("rma-agent", "--version").stdout.strip().startswith("rma-agent ")
    impl = c.run("/opt/rma-agent/bin/python3", "-c",
                 "import _fast, sys; print(_fast.IMPLEMENTATION, sys.version_info[:2])").stdout
    assert impl.strip() == "cython (3, 11)", impl


def test_default_config_is_not_ready_and_says_what_to_edit(installed):
    """The shipped worker config has no seeds: it runs (no crash loop), is not ready, and
    says in STATUS= and in the log that dht.bootstrap must be edited."""
    c = installed
    c.run("systemctl", "restart", UNIT, timeout=60)
    status = c.wait_for("STATUS= text", lambda: c.show(UNIT, "StatusText"), timeout=20)
    assert "bootstrap" in status and CONF in status, status
    assert c.show(UNIT, "ActiveState") == "active"
    code, body = c.curl(f"{API}/readyz")
    assert code == 503 and "bootstrap" in body, (code, body)
    time.sleep(3)  # a crash loop would show as restarts within RestartSec=2
    assert c.show(UNIT, "NRestarts") == "0"
    assert c.show(UNIT, "ActiveState") == "active"
    # The shipped config asks for a quick tunnel; cloudflared is not installed (it is not
    # in Debian), so rma-tunnel fails once, saying so, and does not loop.
    c.wait_for("rma-tunnel to give up", lambda: c.show(TUNNEL, "ActiveState") == "failed",
               timeout=20)
    c.wait_for("the launcher's reason in the tunnel's journal", lambda:
               "cloudflared is not installed" in "\n".join(messages(c.journal(TUNNEL))),
               timeout=20)
    assert c.show(TUNNEL, "ExecMainStatus") == "78"
    assert c.show(TUNNEL, "NRestarts") == "0"
    # The journal, not only STATUS=, says what to edit (one warning line, rate-limited).
    log = "\n".join(messages(c.journal(UNIT)))
    assert "not ready" in log and "bootstrap" in log and CONF in log, log[-2000:]


def test_bad_config_at_start_fails_once_without_looping(installed):
    c = installed
    c.write(CONF, '[agent]\nrole = "boss"\n')
    c.run("systemctl", "restart", UNIT, check=False, timeout=60)
    c.wait_for("unit failed", lambda: c.show(UNIT, "ActiveState") == "failed", timeout=20)
    assert c.show(UNIT, "ExecMainStatus") == "2"          # SPEC §3: 2 = bad config
    time.sleep(3)  # the behaviour under test: no restart within RestartSec=2 and after
    assert c.show(UNIT, "NRestarts") == "0"               # RestartPreventExitStatus=2
    log = "\n".join(messages(c.journal(UNIT)))
    assert "agent.role" in log, log[-2000:]
    c.run("systemctl", "reset-failed", UNIT)


def test_coordinator_ready_status_priorities_metrics(installed):
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    cursor = c.cursor()
    restart_and_wait_active(c)                      # returns after READY=1
    assert c.show(UNIT, "Type") == "notify"
    status = c.show(UNIT, "StatusText")
    assert status and "coordinator" in status, status
    code, _ = c.wait_for("/readyz 200", lambda: (lambda r: r if r[0] == 200 else None)(
        c.curl(f"{API}/readyz")), timeout=20)
    assert code == 200
    code, metrics = c.curl(f"{API}/metrics")
    assert code == 200 and "rma_agent_" in metrics
    assert agent_stats(c)["role"] == "coordinator"
    # What an operator types (SPEC §3): the CLI finds the agent through the installed config.
    check = c.run("rma-agent", "check-config")
    assert "ok: role=coordinator" in check.stdout, check.stdout
    st = c.run("rma-agent", "status")
    assert "coordinator" in st.stdout, st.stdout
    # journald: the agent writes "<N>" prefixes, journald turns them into PRIORITY fields
    # and strips them; the service runs as the rma-agent user.
    entries = [e for e in c.journal(UNIT, cursor) if e.get("_PID") == c.show(UNIT, "MainPID")]
    assert entries, "no journal entries from the agent"
    assert all("PRIORITY" in e for e in entries)
    assert {e["PRIORITY"] for e in entries} <= {str(p) for p in range(8)}
    assert not any(m.startswith("<") and m[1:2].isdigit() for m in messages(entries))
    assert c.run("ps", "-o", "user=", "-p", c.show(UNIT, "MainPID"), check=False).stdout.strip() \
        in ("rma-agent", "")  # procps may be absent from the minimal rootfs
    assert c.show(UNIT, "User") == "rma-agent"
    # The sandbox is really on, and the agent (aiohttp, uvloop, msgpack, cryptography's
    # Ed25519 for the identity below, the Cython kernels) runs under it.
    for prop in ("MemoryDenyWriteExecute", "NoNewPrivileges", "ProtectKernelTunables"):
        assert c.show(UNIT, prop) == "yes", prop
    assert c.show(UNIT, "ProtectSystem") == "strict"
    assert c.show(UNIT, "CapabilityBoundingSet") == ""
    # The identity key was created in the state dir, private to the service user.
    keys = c.sh("find /var/lib/rma-agent -type f -printf '%m %u %p\\n'")
    assert keys.strip(), "no state written"
    for line in keys.strip().splitlines():
        mode, user, _path = line.split(" ", 2)
        assert user == "rma-agent" and int(mode, 8) & 0o077 == 0, line


def test_reload_with_bad_config_keeps_running(installed):
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    restart_and_wait_active(c)
    pid = c.show(UNIT, "MainPID")
    cursor = c.cursor()
    c.write(CONF, COORDINATOR_TOML.replace('mode = "server"', 'mode = "serverr"'))
    c.run("systemctl", "reload", UNIT)
    errors = c.wait_for("reload error in the log", lambda: [
        e for e in c.journal(UNIT, cursor) if "dht.mode" in messages([e])[0]], timeout=15)
    # Logged as an error ("<3>" prefix -> PRIORITY=3), not as plain info.
    assert all(int(e["PRIORITY"]) <= 3 for e in errors), errors
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.show(UNIT, "MainPID") == pid
    assert c.curl(f"{API}/healthz")[0] == 200
    # A good config is taken on the next reload, still without a restart.
    c.write(CONF, COORDINATOR_TOML.replace('name = "coord-test"', 'name = "coord-renamed"'))
    c.run("systemctl", "reload", UNIT)
    c.wait_for("renamed after reload", lambda: "coord-renamed" in c.show(UNIT, "StatusText"),
               timeout=15)
    assert c.show(UNIT, "MainPID") == pid
    c.write(CONF, COORDINATOR_TOML)
    c.run("systemctl", "reload", UNIT)


def proof_checks(c, base: str = API) -> float:
    """Endpoint ownership proofs the agent at ``base`` has checked, whatever the outcome
    (``rma_agent_endpoint_proofs_total``); 0 while its metrics do not answer."""
    code, text = c.curl(f"{base}/metrics")
    if code != 200:
        return 0.0
    return sum(float(v) for v in re.findall(
        r'^rma_agent_endpoint_proofs_total\{outcome="[a-z]+"\} ([0-9.e+]+)$', text, re.M))


def _start_second_agent(c, name: str, toml: str) -> None:
    """A second agent in the same container: a transient unit running the packaged
    binary as the rma-agent user (systemd-run inside the container)."""
    path = f"/etc/rma-agent/{name}.toml"
    c.write(path, toml)
    c.sh(f"install -d -m 0700 -o rma-agent -g rma-agent /var/lib/rma-agent/{name}")
    c.run("systemctl", "stop", f"{name}.service", check=False)
    c.run("systemctl", "reset-failed", f"{name}.service", check=False)
    c.run("systemd-run", f"--unit={name}", "-p", "Type=notify", "-p", "NotifyAccess=main",
          "-p", "User=rma-agent", "-p", "Group=rma-agent",
          "/usr/bin/rma-agent", "run", "-c", path, timeout=60)


def _lookup(c, service: str, base: str) -> list[dict]:
    code, body = c.curl(f"{base}/api/services/{service}")
    if code != 200:
        return []
    data = json.loads(body)
    return data.get("workers", data) if isinstance(data, dict) else data


def test_second_agent_joins_and_is_found_by_lookup(installed):
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    restart_and_wait_active(c)
    _start_second_agent(c, "worker2", worker_toml(
        name="worker-two", dht_port=8469, http_port=8081, seeds=["127.0.0.1:8468"],
        # Its own gateway as endpoint: lookups probe the endpoint's ownership proof
        # ({endpoint}/.well-known/rma-agent/proof) and leave out workers that fail it, so
        # the endpoint must be this worker's gateway, reachable inside the private network.
        service="ocr-test", endpoint="http://127.0.0.1:8091", gateway="127.0.0.1:8091",
        state_dir="/var/lib/rma-agent/worker2"))
    try:
        c.wait_for("worker2 ready", lambda: c.curl("http://127.0.0.1:8081/readyz")[0] == 200,
                   timeout=30)
        found = c.wait_for("worker-two found by lookup on the coordinator", lambda: [
            w for w in _lookup(c, "ocr-test", API) if w.get("name") == "worker-two"], timeout=30)
        assert found[0]["endpoint"] == "http://127.0.0.1:8091"
        # Still found after the proof probe (the lookup above started it: wait until the
        # coordinator counted its outcome), and through the CLI (limit=10, other cache key).
        c.wait_for("the coordinator's ownership proof check of worker-two's endpoint",
                   lambda: proof_checks(c) >= 1, timeout=30)
        out = c.run("rma-agent", "lookup", "ocr-test", "--json").stdout
        assert "worker-two" in out, out
        assert agent_stats(c)["peers"] >= 1
    finally:
        c.run("systemctl", "stop", "worker2.service", check=False)


def test_tunnel_stand_in_gives_the_worker_its_endpoint(installed):
    """rma-tunnel.service runs the cloudflared STAND-IN (RMA_CLOUDFLARED in
    /etc/default/rma-agent) with the flags derived from agent.toml; the worker reads the
    quick-tunnel hostname from it and announces https://<hostname>."""
    c = installed
    # A DHT peer to announce to: a coordinator as a second agent.
    _start_second_agent(c, "coord2", COORDINATOR_TOML.replace("8468", "8470")
                        .replace("8080", "8082").replace("8092", "8093")
                        .replace("coord-test", "coord-two")
                        .replace('"/var/lib/rma-agent"', '"/var/lib/rma-agent/coord2"'))
    try:
        c.write("/etc/default/rma-agent", "RMA_CLOUDFLARED=/srv/tools/fake_cloudflared.py\n")
        c.write(CONF, worker_toml(name="tunnel-worker", dht_port=8468, http_port=8080,
                                  seeds=["127.0.0.1:8470"], service="tunnel-test",
                                  tunnel="quick"))
        c.run("systemctl", "reset-failed", TUNNEL, check=False)
        restart_and_wait_active(c)
        c.wait_for("rma-tunnel active", lambda: c.show(TUNNEL, "ActiveState") == "active",
                   timeout=20)
        # The launcher ran the stand-in with cloudflared's flags, from agent.toml; the
        # origin is the gateway (gateway.listen), never the admin API.
        want = "--no-autoupdate --metrics 127.0.0.1:20241 tunnel --url http://127.0.0.1:8090"
        c.wait_for("cloudflared's flags in the tunnel's journal", lambda: want in
                   "\n".join(messages(c.journal(TUNNEL))), timeout=20)
        _, body = c.wait_for("stand-in /quicktunnel", lambda: (lambda r: r if r[0] == 200
                                else None)(c.curl("http://127.0.0.1:20241/quicktunnel")),
                                timeout=20)
        hostname = json.loads(body)["hostname"]
        assert hostname.endswith(".trycloudflare.com")
        want = f"https://{hostname}"
        c.wait_for("endpoint learned from the tunnel",
                   lambda: agent_stats(c).get("worker", {}).get("endpoint") == want, timeout=30)
        found = c.wait_for(f"tunnel-worker announced as {want}", lambda: [
            w for w in _lookup(c, "tunnel-test", "http://127.0.0.1:8082")
            if w.get("endpoint") == want], timeout=40)
        assert found[0]["name"] == "tunnel-worker"
        # The agent crashes: Restart=on-failure brings it back, and the tunnel with it.
        tunnel_pid = c.show(TUNNEL, "MainPID")
        c.run("kill", "-KILL", c.show(UNIT, "MainPID"))
        c.wait_for("agent restarted", lambda: c.show(UNIT, "NRestarts") == "1"
                   and c.show(UNIT, "ActiveState") == "active", timeout=30)
        c.wait_for("tunnel running again", lambda: c.show(TUNNEL, "ActiveState") == "active",
                   timeout=20)
        print(f"tunnel pid {tunnel_pid} -> {c.show(TUNNEL, 'MainPID')} after agent restart")
        c.wait_for("agent ready again with its endpoint", lambda: c.curl(
            f"{API}/readyz")[0] == 200, timeout=30)
        # Lifetime tied to the agent: stopping the agent stops the tunnel. The agent
        # leaves cleanly (STOPPING=1, exit 0) within TimeoutStopSec= (else Result would
        # be "timeout"); how long it took is printed, not judged (speed is bench/'s).
        t0 = time.monotonic()
        c.run("systemctl", "stop", UNIT)
        print(f"systemctl stop took {time.monotonic() - t0:.1f} s")
        assert c.show(UNIT, "Result") == "success"
        assert c.show(UNIT, "ExecMainStatus") == "0"
        assert c.show(TUNNEL, "ActiveState") in ("inactive", "deactivating")
    finally:
        c.run("systemctl", "stop", "coord2.service", check=False)
        c.write("/etc/default/rma-agent", "")


def test_named_tunnel_uses_its_own_config_and_hostname(installed):
    """tunnel.mode = "named": the launcher passes /etc/rma-agent/cloudflared.yml explicitly
    (a stray /etc/cloudflared/config.yml is ignored) and the worker announces
    https://<tunnel.hostname>."""
    c = installed
    _start_second_agent(c, "coord2", COORDINATOR_TOML.replace("8468", "8470")
                        .replace("8080", "8082").replace("8092", "8093")
                        .replace("coord-test", "coord-two")
                        .replace('"/var/lib/rma-agent"', '"/var/lib/rma-agent/coord2"'))
    try:
        c.write("/etc/default/rma-agent", "RMA_CLOUDFLARED=/srv/tools/fake_cloudflared.py\n")
        c.run("mkdir", "-p", "/etc/cloudflared")
        c.write("/etc/cloudflared/config.yml", "tunnel: stray\n")
        c.write("/etc/rma-agent/cloudflared.yml",
                "tunnel: 6ff42ae2-765d-4adf-8112-31c55c1551ef\n"
                "credentials-file: /etc/rma-agent/6ff42ae2-765d-4adf-8112-31c55c1551ef.json\n")
        toml = worker_toml(name="named-worker", dht_port=8468, http_port=8080,
                           seeds=["127.0.0.1:8470"], service="named-test", tunnel="named")
        c.write(CONF, toml.replace('metrics = "127.0.0.1:20241"',
                                   'metrics = "127.0.0.1:20241"\nhostname = "w-named.example.org"'))
        cursor = c.cursor()
        c.run("systemctl", "reset-failed", TUNNEL, check=False)
        restart_and_wait_active(c)
        c.wait_for("rma-tunnel active", lambda: c.show(TUNNEL, "ActiveState") == "active",
                   timeout=20)
        # the unit is active before the stand-in's first line reaches the journal: wait
        # for the line (read once, it raced: 1 of 2 clean-clone runs)
        want = "tunnel --config /etc/rma-agent/cloudflared.yml run"
        c.wait_for("cloudflared's command line in the tunnel's journal", lambda: want in
                   "\n".join(messages(c.journal(TUNNEL, cursor))), timeout=20)
        found = c.wait_for("named-worker announced", lambda: [
            w for w in _lookup(c, "named-test", "http://127.0.0.1:8082")
            if w.get("endpoint") == "https://w-named.example.org"], timeout=40)
        assert found[0]["name"] == "named-worker"
    finally:
        c.run("systemctl", "stop", "coord2.service", check=False)
        c.run("rm", "-rf", "/etc/cloudflared", "/etc/rma-agent/cloudflared.yml")
        c.write("/etc/default/rma-agent", "")


def test_tunnel_mode_off_skips_the_tunnel_unit(installed):
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    c.run("systemctl", "reset-failed", TUNNEL, check=False)
    restart_and_wait_active(c)
    c.wait_for("rma-tunnel condition checked",
               lambda: c.show(TUNNEL, "ConditionResult") == "no", timeout=15)
    assert c.show(TUNNEL, "ActiveState") == "inactive"


def test_hung_agent_is_restarted_by_the_watchdog(installed):
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    c.run("mkdir", "-p", "/run/systemd/system/rma-agent.service.d")
    c.write("/run/systemd/system/rma-agent.service.d/watchdog.conf",
            "[Service]\nWatchdogSec=3\nTimeoutAbortSec=5\n")
    try:
        c.run("systemctl", "daemon-reload")
        restart_and_wait_active(c)
        assert c.show(UNIT, "WatchdogUSec") == "3s"
        time.sleep(4)  # pings at half the period keep it alive while the loop runs
        assert c.show(UNIT, "NRestarts") == "0"
        pid = c.show(UNIT, "MainPID")
        c.run("kill", "-STOP", pid)
        c.wait_for("watchdog restart", lambda: c.show(UNIT, "NRestarts") == "1"
                   and c.show(UNIT, "ActiveState") == "active"
                   and c.show(UNIT, "MainPID") not in ("0", pid), timeout=40)
        log = "\n".join(messages(c.journal(UNIT)))
        assert "Watchdog timeout" in log
    finally:
        c.run("rm", "-rf", "/run/systemd/system/rma-agent.service.d")
        c.run("systemctl", "daemon-reload")


def test_units_verify_clean_and_security_exposure(installed, record_property):
    c = installed
    r = c.run("systemd-analyze", "verify", f"/lib/systemd/system/{UNIT}",
              f"/lib/systemd/system/{TUNNEL}", check=False)
    # verify exits 0 even when it prints errors: the output must be empty.
    assert (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
    # NVIDIA GPUs stay usable: no PrivateDevices (it would hide /dev/nvidia*), a closed
    # device policy that allows the NVIDIA driver's character devices.
    assert c.show(UNIT, "PrivateDevices") == "no"
    assert c.show(UNIT, "DevicePolicy") == "closed"
    assert "char-nvidia* rw" in c.show(UNIT, "DeviceAllow")
    for unit, limit in ((UNIT, 2.0), (TUNNEL, 2.0)):
        out = c.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert m, out[-2000:]
        record_property(f"exposure {unit}", m.group(1))
        print(f"systemd-analyze security {unit}: {m.group(1)}")
        assert float(m.group(1)) <= limit, out


def test_upgrade_keeps_edited_config_and_restarts(installed, deb):
    """Re-installing the package (dpkg runs prerm upgrade / postinst configure <old>)
    keeps the edited conffile and restarts the running agent on the new files."""
    c = installed
    c.write(CONF, COORDINATOR_TOML)
    restart_and_wait_active(c)
    pid = c.show(UNIT, "MainPID")
    r = c.run("apt-get", "install", "-y", "--reinstall", f"/srv/pkg/{deb.name}",
              timeout=180, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert c.read(CONF) == COORDINATOR_TOML
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.show(UNIT, "MainPID") not in ("0", pid), "not restarted on upgrade"
    assert c.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert "coordinator" in c.show(UNIT, "StatusText")


def test_remove_keeps_config_then_purge_leaves_nothing(installed):
    c = installed
    uid = c.run("id", "-u", "rma-agent").stdout.strip()
    # remove (not purge) stops the agent, keeps configuration, state and the user.
    c.run("apt-get", "remove", "-y", "rma-agent", timeout=120)
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    assert c.exists(CONF) and c.exists("/var/lib/rma-agent")
    assert c.run("getent", "passwd", "rma-agent", check=False).returncode == 0
    assert not c.exists("/opt/rma-agent/bin/rma-agent")
    assert not c.exists("/opt/rma-agent"), c.sh("find /opt/rma-agent | head -20")
    c.run("apt-get", "purge", "-y", "rma-agent", timeout=120)
    assert c.run("dpkg-query", "-W", "-f=${Status}", "rma-agent", check=False).stdout \
        .strip() in ("", "unknown ok not-installed")
    for path in ("/etc/rma-agent", "/var/lib/rma-agent", "/opt/rma-agent", "/usr/bin/rma-agent",
                 "/lib/systemd/system/rma-agent.service", "/etc/default/rma-agent",
                 "/etc/systemd/system/multi-user.target.wants/rma-agent.service",
                 "/etc/systemd/system/rma-agent.service.wants"):
        assert not c.exists(path), f"{path} left after purge"
    assert c.run("getent", "passwd", "rma-agent", check=False).returncode == 2
    assert c.run("getent", "group", "rma-agent", check=False).returncode == 2
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() in (
        "inactive", "unknown")
    leftover = c.sh(f"find / -xdev \\( -uid {uid} -o -name 'rma-agent*' \\) "
                    "-not -path '/proc/*' -not -path '/srv/*' -not -path '/var/log/journal/*' "
                    "-print 2>/dev/null || true")
    assert leftover.strip() == "", leftover
