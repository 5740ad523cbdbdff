"""The fleet's path: a signed apt repository, install, upgrade, downgrade, unattended upgrade.

For each release (bookworm, then trixie) one booted container (conftest.boot) runs, in
file order, what a volunteer's box goes through:

1. a repository signed by someone else's key is refused at ``apt-get update``;
2. a package swapped in the repository (valid signature, different bytes) is refused by
   apt's hash check and nothing of it runs;
3. the volunteer's two lines (README: key + deb822 ``.sources`` with ``Signed-By:``),
   ``apt-get update``, ``apt-get install rma-agent`` -> version N;
4. the operator edits the conffile into a worker; a coordinator runs next to it;
   ``apt-get upgrade`` to N+1 restarts the agent once: the edit survives, the node id and
   the state directory (identity key, the coordinator's routing snapshot) are kept, and the
   coordinator finds the worker again <= 5 s after the restart (measured from the new
   process's start, printed);
5. downgrade to N, then ``unattended-upgrade`` brings N+1 back without a prompt;
6. remove + install again keeps config and identity;
7. ``systemd-analyze security`` <= 2.0 on this release's systemd.

The repository is made by ``packaging/build-repo.sh`` on the host with a throw-away key and
served inside the container on loopback by ``python3 -m http.server`` from a read-only
bind mount; N+1 is the same tree repacked as revision 2 (conftest ``next_debs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.roles.coordinator import SNAPSHOT_INTERVAL
from tests.appliance.conftest import TOOLS, boot
from tests.appliance.releases import RELEASES, REPO, deb_version, upstream_version

# its tests share one container and run in file order on it: tests/conftest.py keeps
# every appliance test on one pytest-xdist worker (group "appliance")
pytestmark = [pytest.mark.slow, pytest.mark.nspawn]

UNIT = "rma-agent.service"
CONF = "/etc/rma-agent/agent.toml"
REPO_URL = "http://127.0.0.1:8000/current"
KEYRING = "/etc/apt/keyrings/rma-agent.asc"
WORKER_API = "http://127.0.0.1:8080"
COORD_API = "http://127.0.0.1:8082"
SERVICE = "upgrade-test"
FOUND_AGAIN_LIMIT_S = 5.0

WORKER_TOML = f"""\
# Edited by the operator: this box is a worker (the upgrade must keep this file).
[agent]
role = "worker"
name = "upgrade-worker"
region = "test"
state_dir = "/var/lib/rma-agent"

[dht]
listen = "127.0.0.1:8468"
bootstrap = ["127.0.0.1:8470"]
mode = "server"
record_ttl = 60
republish_interval = 5

[http]
listen = "127.0.0.1:8080"

[gateway]
listen = "127.0.0.1:8090"

[worker]
services = ["{SERVICE}"]
# Its own gateway: lookups probe the endpoint's ownership proof there.
endpoint = "http://127.0.0.1:8090"

[tunnel]
mode = "off"
"""

COORD_TOML = """\
[agent]
role = "coordinator"
name = "upgrade-coord"
region = "test"
state_dir = "/var/lib/rma-agent/coord"

[dht]
listen = "127.0.0.1:8470"
bootstrap = []
mode = "server"

[http]
listen = "127.0.0.1:8082"

[gateway]
listen = "127.0.0.1:8092"

[tunnel]
mode = "off"

[discovery]
# the worker it looks up is on this box's loopback
allow_private_hosts = ["127.0.0.1"]
"""


# ----------------------------------------------------------------- host-side repositories
def _gpg(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gpg", "--batch", "--homedir", str(home), *args],
                          capture_output=True, text=True, check=True)


def _secret_key(tmp: Path, uid: str) -> Path:
    """A fresh unprotected Ed25519 signing key, exported to a file (what an operator
    hands build-repo.sh)."""
    home = tmp / f"gnupg-{uid.split()[0]}"
    home.mkdir(mode=0o700)
    try:
        _gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        out = tmp / f"{uid.split()[0]}.key"
        out.write_text(_gpg(home, "--armor", "--export-secret-keys").stdout)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    return out


def _build_repo(key: Path, debs: list[Path], out: Path, tmp: Path) -> None:
    dist = tmp / f"dist-{out.name}"
    dist.mkdir()
    for d in debs:
        os.link(d, dist / d.name) if d.stat().st_dev == dist.stat().st_dev \
            else shutil.copy(d, dist / d.name)
    r = subprocess.run(["bash", str(REPO / "packaging" / "build-repo.sh"), "--key", str(key),
                        "--dist", str(dist), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip())


def _tamper(deb: Path) -> None:
    """Rewrite ``deb`` in place with a postinst that leaves a mark (an attacker's package
    under the genuine name): only the control member changes, data is kept."""
    work = deb.parent / f".tamper-{deb.stem}"
    work.mkdir()
    try:
        subprocess.run(["ar", "x", str(deb.resolve())], cwd=work, check=True)
        members = subprocess.run(["ar", "t", str(deb)], capture_output=True, text=True,
                                 check=True).stdout.split()
        control = next(m for m in members if m.startswith("control.tar"))
        mode = {".xz": "xz", ".gz": "gz", ".zst": None}.get(Path(control).suffix, "")
        assert mode is not None, control
        ctl = work / "ctl"
        with tarfile.open(work / control, f"r:{mode}" if mode else "r") as t:
            t.extractall(ctl, filter="tar")
        postinst = ctl / "postinst"
        lines = postinst.read_text().splitlines(keepends=True)
        postinst.write_text(lines[0] + "touch /tampered\n" + "".join(lines[1:]))
        with tarfile.open(work / control, f"w:{mode}" if mode else "w") as t:
            t.add(ctl, arcname=".")
        deb.unlink()
        subprocess.run(["ar", "rc", str(deb), *members], cwd=work, check=True)
    finally:
        shutil.rmtree(work)


@pytest.fixture(scope="session")
def repos(debs, next_debs, tmp_path_factory) -> Path:
    """Host directory served as /srv/repos in the containers, ``current`` -> the one in use:
    n (N, both suites), n1 (N and N+1), evil (n1's packages signed by another key),
    tampered (n with its packages swapped after signing)."""
    tmp = tmp_path_factory.mktemp("repos")
    served = tmp / "served"
    served.mkdir()
    key = _secret_key(tmp, "rma-test-archive <archive@example.org>")
    evil_key = _secret_key(tmp, "attacker <evil@example.org>")
    n = [debs[r] for r in RELEASES]
    n1 = n + [next_debs[r] for r in RELEASES]
    _build_repo(key, n, served / "n", tmp)
    _build_repo(key, n1, served / "n1", tmp)
    _build_repo(evil_key, n1, served / "evil", tmp)
    shutil.copytree(served / "n", served / "tampered")
    for deb in (served / "tampered" / "pool").rglob("*.deb"):
        _tamper(deb)
    # The attacker's repository offers the genuine key file, as a compromised mirror would.
    shutil.copy(served / "n" / "rma-agent-archive-keyring.asc",
                served / "evil" / "rma-agent-archive-keyring.asc")
    # apt asks with If-Modified-Since and http.server answers 304 when a file is not newer
    # (one-second resolution): give the repositories distinct ages in the order the tests
    # serve them, as successive publications would have.
    now = time.time()
    for k, name in enumerate(("evil", "tampered", "n", "n1")):
        for p in (served / name).rglob("*"):
            os.utime(p, (now - 400 + 100 * k,) * 2, follow_symlinks=False)
    (served / "current").symlink_to("n")
    return served


def _serve(repos: Path, name: str) -> None:
    """Switch what http://127.0.0.1:8000/current is (a relative symlink on the host,
    followed by the container's HTTP server on each request)."""
    tmp_link = repos / ".current.new"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(name)
    tmp_link.rename(repos / "current")


# ----------------------------------------------------------------- the container
@pytest.fixture(scope="module", params=RELEASES)
def release(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def box(release, repos, tmp_path_factory) -> Iterator:
    """A booted ``release`` with the repositories on loopback port 8000 and no other apt
    source (the container has no network beyond its loopback)."""
    c = boot(release, {repos: "/srv/repos", TOOLS: "/srv/tools"},
             tmp_path_factory.mktemp(f"nspawn-{release}"))
    try:
        c.run("systemd-run", "--unit=repo-http", "/usr/bin/python3", "-m", "http.server",
              "8000", "--bind", "127.0.0.1", "--directory", "/srv/repos")
        c.wait_for("repository served", lambda: c.curl(
            f"{REPO_URL}/rma-agent-archive-keyring.asc")[0] == 200, timeout=20)
        c.sh("rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*")
        c.release = release
        yield c
    finally:
        c.stop()
        assert not c.leftovers(), f"cgroups left behind: {c.leftovers()}"


def _apt(c, *args: str, check: bool = True, timeout: float = 180):
    r = c.run("apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", *args, check=False,
              timeout=timeout, input="")
    if check:
        assert r.returncode == 0, f"apt-get {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _installed_version(c) -> str:
    r = c.run("dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", "rma-agent", check=False)
    status, _, version = r.stdout.strip().partition(" ")
    return version if status == "installed" else ""


def _stats(c, base: str = WORKER_API) -> dict:
    code, body = c.curl(f"{base}/api/dht/stats")
    assert code == 200, (code, body)
    return json.loads(body)


def _readme_lines(codename_from_box: bool = True) -> list[str]:
    """The two lines README.md tells a volunteer to run (between the markers)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- apt-lines -->", 2)[1]
    lines = [ln.strip() for ln in block.splitlines()
             if ln.strip().startswith(("curl", "printf", "sudo"))]
    assert len(lines) == 2, lines
    return lines


def _add_repository(c) -> None:
    """Run README's two lines against the loopback repository (without sudo: root)."""
    for line in _readme_lines():
        line = line.replace("https://apt.example.org/rma-agent", REPO_URL)
        line = re.sub(r"\bsudo ", "", line)
        c.sh(line)


# ----------------------------------------------------------------- the tests
def test_repository_signed_by_another_key_is_refused(box, repos):
    c = box
    _add_repository(c)
    _serve(repos, "evil")
    r = _apt(c, "update", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "is not signed" in out or "NO_PUBKEY" in out or "signature" in out.lower(), out
    policy = c.run("apt-cache", "policy", "rma-agent").stdout
    assert "Candidate: (none)" in policy or policy.strip() == "", policy


def test_swapped_package_is_refused_by_the_hash_check(box, repos):
    c = box
    _serve(repos, "tampered")
    _apt(c, "update")
    r = _apt(c, "install", "rma-agent", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(r"Hash Sum mismatch|unexpected size|Hashes of expected file", out), out
    assert _installed_version(c) == ""
    assert not c.exists("/tampered")


def test_install_from_the_repository(box, repos):
    c = box
    _serve(repos, "n")
    c.run("apt-get", "clean")
    r = _apt(c, "update")
    assert "W:" not in r.stdout + r.stderr, r.stdout + r.stderr
    _apt(c, "install", "--no-install-recommends", "rma-agent")
    assert _installed_version(c) == deb_version(c.release)
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"
    policy = c.run("apt-cache", "policy", "rma-agent").stdout
    assert "127.0.0.1:8000/current" in policy, policy


def _start_coordinator(c) -> None:
    c.write("/etc/rma-agent/coord.toml", COORD_TOML)
    c.sh("install -d -m 0700 -o rma-agent -g rma-agent /var/lib/rma-agent/coord")
    c.run("systemd-run", "--unit=coord", "-p", "Type=notify", "-p", "NotifyAccess=main",
          "-p", "User=rma-agent", "-p", "Group=rma-agent",
          "/usr/bin/rma-agent", "run", "-c", "/etc/rma-agent/coord.toml", timeout=60)


def _lookup_ids(c) -> list[str]:
    code, body = c.curl(f"{COORD_API}/api/services/{SERVICE}")
    if code != 200:
        return []
    return [w.get("id") for w in json.loads(body).get("workers", [])]


def _state_digest(c, path: str) -> str:
    return c.run("sha256sum", path).stdout.split()[0]


def test_upgrade_keeps_config_identity_and_is_found_again_quickly(box, repos):
    c = box
    _start_coordinator(c)
    c.write(CONF, WORKER_TOML)
    c.run("systemctl", "restart", UNIT, timeout=60)
    node_id = c.wait_for("worker node id", lambda: _stats(c).get("dht", {}).get("node_id")
                         or _stats(c).get("node_id"), timeout=20)
    worker_id = c.wait_for("worker found by the coordinator", lambda: [
        i for i in _lookup_ids(c)], timeout=40)[0]
    key_files = c.sh("find /var/lib/rma-agent -maxdepth 1 -type f ! -name routing.json "
                     "-printf '%p\\n' | sort").split()
    assert key_files, "no identity key in /var/lib/rma-agent"
    keys_before = {p: _state_digest(c, p) for p in key_files}
    snapshot = "/var/lib/rma-agent/coord/routing.json"
    # written every SNAPSHOT_INTERVAL (60 s) once the table has a contact: a first round
    # that found the table still empty means the file comes a whole interval later
    c.wait_for("coordinator's routing snapshot", lambda: c.exists(snapshot),
               timeout=2.5 * SNAPSHOT_INTERVAL)
    snap_node = json.loads(c.read(snapshot))["node_id"]
    old_pid = c.show(UNIT, "MainPID")
    cursor = c.cursor()

    # Watch the lookup on the coordinator while the upgrade runs.
    c.run("systemd-run", "--unit=poller", "/usr/bin/python3", "/srv/tools/lookup_poller.py",
          f"{COORD_API}/api/services/{SERVICE}", "/run/poll.jsonl", "--interval", "0.05",
          "--duration", "120")
    c.wait_for("poller running", lambda: c.exists("/run/poll.jsonl"), timeout=10)

    _serve(repos, "n1")
    _apt(c, "update")
    t0 = time.monotonic()
    r = _apt(c, "upgrade", timeout=300)
    upgrade_s = time.monotonic() - t0
    assert "rma-agent" in r.stdout, r.stdout[-2000:]
    assert _installed_version(c) == deb_version(c.release, 2)

    # Restarted exactly once, on the new files, with the edited conffile.
    new_pid = c.show(UNIT, "MainPID")
    assert new_pid not in ("0", old_pid)
    assert c.show(UNIT, "NRestarts") == "0"
    jobs = [(e.get("JOB_TYPE"), e.get("JOB_RESULT")) for e in c.journal(UNIT, cursor)
            if e.get("JOB_TYPE")]
    assert jobs.count(("start", "done")) == 1, jobs     # one restart: withdraw, start
    assert c.read(CONF) == WORKER_TOML
    assert c.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"

    # Found again within 5 s of the restart (the new process's start).
    start_mono = int(c.show(UNIT, "ExecMainStartTimestampMonotonic")) / 1e6
    found = c.wait_for("worker found again", lambda: _found_after(c, worker_id, start_mono),
                       timeout=30, interval=0.5)
    c.run("systemctl", "stop", "poller.service", check=False)
    gone = [s["t"] for s in _samples(c) if s["t"] < found
            and worker_id not in [w[0] for w in s.get("workers", [])]]
    gap = f", absent from lookups for {found - gone[0]:.2f} s" if gone else ""
    print(f"{c.release}: upgrade {deb_version(c.release)} -> {deb_version(c.release, 2)} "
          f"took {upgrade_s:.1f} s; worker found again {found - start_mono:.2f} s after the "
          f"restart{gap}")
    if found - start_mono > FOUND_AGAIN_LIMIT_S / 2:   # what the new process did, and when
        for e in c.journal(UNIT, cursor) + c.journal("coord.service", cursor):
            print(f"  {int(e['__MONOTONIC_TIMESTAMP']) / 1e6 - start_mono:+7.2f} s "
                  f"[{e.get('_PID', '')}] {e.get('MESSAGE', '')}")
        print("  coordinator's discovery:", json.dumps(_stats(c, COORD_API).get("discovery")))
    assert found - start_mono <= FOUND_AGAIN_LIMIT_S

    # Same identity, same state.
    assert (_stats(c).get("dht", {}).get("node_id") or _stats(c).get("node_id")) == node_id
    assert {p: _state_digest(c, p) for p in key_files} == keys_before
    assert json.loads(c.read(snapshot))["node_id"] == snap_node

    # The agent says its version: STATUS=, /api/dht/stats, its record (as the coordinator
    # stores it) and the coordinator's count of its peers' versions.
    version = upstream_version()
    assert f"v{version}" in c.show(UNIT, "StatusText")
    assert _stats(c)["version"] == version
    code, body = c.curl(f"{COORD_API}/api/dht/providers/{SERVICE}")
    assert code == 200, body
    assert [r["agent_version"] for r in json.loads(body)["records"]
            if r["id"] == worker_id] == [version]
    assert _stats(c, COORD_API)["versions"]["peers"] == {version: 1}


def _found_after(c, worker_id: str, start_mono: float) -> float | None:
    """CLOCK_MONOTONIC time of the first poll that returned a record of ``worker_id``
    issued after ``start_mono`` (issued = poll time - age_s; age_s is rounded to 0.1 s,
    and the old process's last record was issued before it stopped, well before the new
    process started)."""
    for s in _samples(c):
        for wid, age in s.get("workers", []):
            if wid == worker_id and age is not None and s["t"] - age >= start_mono - 0.1:
                return s["t"]
    return None


def _samples(c) -> list[dict]:
    return [json.loads(ln) for ln in c.read("/run/poll.jsonl").splitlines() if ln.strip()]


def test_downgrade_then_unattended_upgrade_without_a_prompt(box, repos):
    """Back to N (apt-get install rma-agent=N --allow-downgrades), then unattended-upgrades
    (the origin allowed as README says) brings N+1 back on its own: no prompt, since the
    conffile is the same in both versions (the operator's edit is kept silently)."""
    c = box
    node_id = _stats(c)["node_id"]
    _apt(c, "install", "--allow-downgrades", f"rma-agent={deb_version(c.release)}")
    assert _installed_version(c) == deb_version(c.release)
    assert c.read(CONF) == WORKER_TOML
    c.wait_for("ready after the downgrade", lambda: c.curl(f"{WORKER_API}/readyz")[0] == 200,
               timeout=30)
    assert _stats(c)["node_id"] == node_id
    c.write("/etc/apt/apt.conf.d/51rma-agent",
            'Unattended-Upgrade::Origins-Pattern { "origin=rma-agent,codename=${distro_codename}"; };\n')
    pid = c.show(UNIT, "MainPID")
    # As the apt-daily-upgrade timer runs it: no terminal, nothing on stdin.
    r = c.run("unattended-upgrade", "-v", check=False, timeout=300, input="")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert _installed_version(c) == deb_version(c.release, 2), log[-3000:]
    # (unattended-upgrades holds back a package whose upgrade would ask about a conffile:
    # "Package rma-agent has conffile prompt and needs to be upgraded manually".)
    assert "Packages that will be upgraded: rma-agent" in log, log[-3000:]
    assert "conffile prompt" not in log, log[-3000:]
    assert c.read(CONF) == WORKER_TOML
    assert c.show(UNIT, "MainPID") not in ("0", pid)
    c.wait_for("ready after the unattended upgrade",
               lambda: c.curl(f"{WORKER_API}/readyz")[0] == 200, timeout=30)
    assert _stats(c)["node_id"] == node_id


def test_remove_then_install_again_keeps_config_and_identity(box):
    c = box
    node_id = _stats(c)["node_id"]
    _apt(c, "remove", "rma-agent")
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    assert c.read(CONF) == WORKER_TOML
    _apt(c, "install", "rma-agent")
    assert _installed_version(c) == deb_version(c.release, 2)
    assert c.read(CONF) == WORKER_TOML
    c.wait_for("ready after re-install", lambda: c.curl(f"{WORKER_API}/readyz")[0] == 200,
               timeout=30)
    assert _stats(c)["node_id"] == node_id
    assert c.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"


def test_security_exposure_on_this_release(box, record_property):
    """systemd-analyze security of this release's systemd (252 on bookworm, 257 on trixie,
    which checks more settings): both units <= 2.0; units verify without a word."""
    c = box
    r = c.run("systemd-analyze", "verify", f"/lib/systemd/system/{UNIT}",
              "/lib/systemd/system/rma-tunnel.service", check=False)
    assert (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
    for unit in (UNIT, "rma-tunnel.service"):
        out = c.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert m, out[-2000:]
        record_property(f"exposure {c.release} {unit}", m.group(1))
        print(f"{c.release}: systemd-analyze security {unit}: {m.group(1)}")
        assert float(m.group(1)) <= 2.0, out
