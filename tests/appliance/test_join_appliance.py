"""``rma-agent join`` on booted Debian 12 and 13, as a new volunteer would run it, into a
closed network.

``apt install`` the .deb (its postinst starts the agent with the packaged default
config); a coordinator runs in the same container (``--private-network``: loopback is
all there is) as a transient unit of the same package under the service user, with an
issuer certificate made from a network key on the host and an enrollment token from
``rma-agent token create``. Then ``rma-agent join URL --token T --service files=...``
must enroll, replace the untouched packaged config without ``--force`` (dpkg's conffile
checksum says it is the default), keep the identity the daemon already made, restart the
unit under systemd's sandboxing, and wait until a lookup through the coordinator finds
the worker; a request routed by the coordinator then reaches the worker's upstream, and
``rma-agent status`` shows the certificate and its renewal. Running join again changes
nothing (no second enrollment: the token was single-use); an edited config is refused
without ``--force``. The transcript is printed (-s) and kept in the log directory.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator

import pytest

from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey, b64_key, parse_public_key
from tests.appliance.conftest import TOOLS, boot
from tests.appliance.releases import RELEASES

# its tests share one container and run in file order on it: tests/conftest.py keeps
# every appliance test on one pytest-xdist worker (group "appliance")
pytestmark = [pytest.mark.slow, pytest.mark.nspawn]

UNIT = "rma-agent.service"
CONF = "/etc/rma-agent/agent.toml"
COORD_TOML = "/etc/coord.toml"
COORD_API = "http://127.0.0.1:8081"
COORD_URL = "http://127.0.0.1:8092"          # the coordinator's gateway (public face)

COORDINATOR = """\
[agent]
role = "coordinator"
name = "coord-1"
state_dir = "/var/lib/coord"

[dht]
listen = "127.0.0.1:8470"
mode = "server"

[http]
listen = "127.0.0.1:8081"

[gateway]
listen = "127.0.0.1:8092"

[network]
admission_keys = ["{netkey}"]
issuer_cert = "/etc/coord.issuer"

[tunnel]
mode = "off"

[discovery]
allow_private_hosts = ["127.0.0.1"]
"""


@pytest.fixture(scope="module", params=RELEASES)
def release(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def installed(release, debs, tmp_path_factory) -> Iterator:
    deb = debs[release]
    c = boot(release, {deb.parent: "/srv/pkg", TOOLS: "/srv/tools"},
             tmp_path_factory.mktemp(f"nspawn-join-{release}"))
    try:
        r = c.run("apt-get", "install", "-y", "--no-install-recommends",
                  f"/srv/pkg/{deb.name}", timeout=180, check=False)
        assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        c.release = release
        yield c
    finally:
        c.stop()
        assert not c.leftovers(), f"cgroups left behind: {c.leftovers()}"


def _start_helpers(c) -> str:
    """The upstream (a static file server) and a closed network's coordinator, as
    transient units; the enrollment token it made."""
    c.sh("mkdir -p /srv/www && printf 'hello from the joined box\\n' > /srv/www/hello.txt")
    c.run("systemd-run", "--unit=upstream", "-p", "DynamicUser=yes", "python3", "-m",
          "http.server", "9000", "--bind", "127.0.0.1", "--directory", "/srv/www")
    netkey = NetworkKey.generate()
    c.write(COORD_TOML, COORDINATOR.format(netkey=b64_key(netkey.public_key)))
    c.sh("install -d -m 0700 -o rma-agent -g rma-agent /var/lib/coord")
    ident = c.run("runuser", "-u", "rma-agent", "--", "rma-agent", "identity", "-c",
                  COORD_TOML).stdout
    coord_key = parse_public_key(ident.split("public_key:")[1].strip(), "public_key")
    issuer = IssuerCertificate.issue(netkey, coord_key, name="coord-1", max_cert_days=7)
    c.write("/etc/coord.issuer", base64.b64encode(issuer.encode()).decode() + "\n")
    # Type=notify: systemd-run returns once the coordinator said READY=1
    c.run("systemd-run", "--unit=coord", "-p", "Type=notify", "-p", "NotifyAccess=main",
          "-p", "User=rma-agent", "/usr/bin/rma-agent", "run", "-c", COORD_TOML, timeout=90)
    c.wait_for("coordinator ready", lambda: c.curl(f"{COORD_API}/readyz")[0] == 200,
               timeout=30)
    return c.run("runuser", "-u", "rma-agent", "--", "rma-agent", "token", "create", "-c",
                 COORD_TOML, "--services", "files", "--name", "volunteers").stdout.strip()


def test_join_on_a_fresh_box_enrolls_is_found_and_routed_to(installed, tmp_path_factory):
    c = installed
    token = _start_helpers(c)
    key_before = c.sh("sha256sum /var/lib/rma-agent/identity.key 2>/dev/null || true")
    argv = ["rma-agent", "join", COORD_URL, "--token", token,
            "--service", "files=http://127.0.0.1:9000", "--endpoint", "http://127.0.0.1:8090",
            "--name", "volunteer-1", "--timeout", "60"]
    t0 = time.monotonic()
    r = c.run(*argv, check=False, timeout=120)
    took = time.monotonic() - t0
    shown = " ".join(argv).replace(token, token[:9] + "...")
    transcript = (f"# Debian {c.release}: {shown}\n{r.stdout}{r.stderr}"
                  f"(exit {r.returncode}, {took:.1f} s)\n")
    print("\n" + transcript)
    (tmp_path_factory.mktemp("join") / "transcript.txt").write_text(transcript)
    assert r.returncode == 0, transcript + c.run("journalctl", "-u", UNIT, "-n", "60",
                                                 "--no-pager", check=False).stdout
    assert "enrolled: certificate until" in r.stdout, r.stdout
    assert "found by the network (dht lookup) at http://127.0.0.1:8090" in r.stdout
    assert re.search(r"config /etc/rma-agent/agent.toml: replaced", r.stdout), r.stdout
    # the daemon's own identity was kept; what join made in the state dir is the
    # service user's (the daemon renews the certificate in place)
    if key_before.strip():
        assert c.sh("sha256sum /var/lib/rma-agent/identity.key") == key_before
    assert c.sh("stat -c '%a %U' /var/lib/rma-agent/identity.key").strip() == "600 rma-agent"
    assert c.sh("stat -c '%U' /var/lib/rma-agent/admission.cert").strip() == "rma-agent"
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.run("rma-agent", "check-config", check=False).returncode == 0

    # the coordinator routes a request to the worker's upstream
    code, body = c.curl(f"{COORD_API}/route/files/hello.txt")
    assert (code, body) == (200, "hello from the joined box\n"), (code, body)
    code, body = c.curl(f"{COORD_API}/api/services/files")
    assert code == 200 and [w["name"] for w in json.loads(body)["workers"]] == ["volunteer-1"]
    status = c.run("rma-agent", "status").stdout
    assert re.search(r"admission cert\s+until .*; renewal waiting", status), status

    # again: nothing changes (no enrollment, config bytes, the running process)
    conf, pid = c.read(CONF), c.show(UNIT, "MainPID")
    again = c.run(*argv[:-1], "0", check=False, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "still valid: not enrolling again" in again.stdout
    assert "config /etc/rma-agent/agent.toml: unchanged" in again.stdout
    assert "already running with this config" in again.stdout
    assert c.read(CONF) == conf and c.show(UNIT, "MainPID") == pid

    # an edited config is not overwritten without --force
    c.sh(f"sed -i 's/^region = \"\"/region = \"home\"/' {CONF}")
    refused = c.run(*argv[:-1], "0", check=False, timeout=120)
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    assert "enrolled" not in refused.stdout               # refused before using the token
    forced = c.run(*argv[:-1], "0", "--force", check=False, timeout=120)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "still valid: not enrolling again" in forced.stdout
    backup = re.search(r"previous file is kept as (\S+)\)", forced.stdout)
    assert backup and 'region = "home"' in c.read(backup.group(1)), forced.stdout
    assert c.read(CONF) == conf
    c.run("systemctl", "stop", "coord.service", "upstream.service", check=False)
