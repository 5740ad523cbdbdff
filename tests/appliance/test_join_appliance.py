"""``rma-agent join`` on a booted Debian 12, as a new volunteer would run it.

``apt install`` the .deb (its postinst starts the agent with the packaged default
config), then ``rma-agent join URL --service files=...`` against a coordinator running
in the same container (``--private-network``: loopback is all there is; it runs as a
transient unit of the same package, with its own state dir). join must replace the
untouched packaged config without ``--force`` (dpkg's conffile checksum says it is the
default), keep the identity the daemon already made, restart the unit under systemd's
sandboxing, and wait until a lookup through the coordinator finds the worker; a request
routed by the coordinator then reaches the worker's upstream. Running join again changes
nothing: same config bytes, the unit not restarted. The transcript is printed (-s) and
kept in the test's log directory for the issue note.
"""

from __future__ import annotations

import json
import re
import time

import pytest

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

[tunnel]
mode = "off"

[discovery]
allow_private_hosts = ["127.0.0.1"]
"""


@pytest.fixture(scope="module")
def installed(container, deb):
    r = container.run("apt-get", "install", "-y", "--no-install-recommends",
                      f"/srv/pkg/{deb.name}", timeout=180, check=False)
    assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return container


def _start_helpers(c) -> None:
    """The upstream (a static file server) and the coordinator, as transient units."""
    c.sh("mkdir -p /srv/www && printf 'hello from the joined box\\n' > /srv/www/hello.txt")
    c.run("systemd-run", "--unit=upstream", "-p", "DynamicUser=yes", "python3", "-m",
          "http.server", "9000", "--bind", "127.0.0.1", "--directory", "/srv/www")
    c.write(COORD_TOML, COORDINATOR)
    # Type=notify: systemd-run returns once the coordinator said READY=1
    c.run("systemd-run", "--unit=coord", "-p", "Type=notify", "-p", "NotifyAccess=main",
          "-p", "DynamicUser=yes", "-p", "StateDirectory=coord",
          "/usr/bin/rma-agent", "run", "-c", COORD_TOML, timeout=90)
    c.wait_for("coordinator ready", lambda: c.curl(f"{COORD_API}/readyz")[0] == 200,
               timeout=30)


def test_join_on_a_fresh_box_is_found_and_routed_to(installed, tmp_path_factory):
    c = installed
    _start_helpers(c)
    key_before = c.sh("sha256sum /var/lib/rma-agent/identity.key 2>/dev/null || true")
    argv = ["rma-agent", "join", COORD_URL, "--service", "files=http://127.0.0.1:9000",
            "--endpoint", "http://127.0.0.1:8090", "--name", "volunteer-1", "--timeout", "60"]
    t0 = time.monotonic()
    r = c.run(*argv, check=False, timeout=120)
    took = time.monotonic() - t0
    transcript = f"# {' '.join(argv)}\n{r.stdout}{r.stderr}(exit {r.returncode}, {took:.1f} s)\n"
    print("\n" + transcript)
    (tmp_path_factory.mktemp("join") / "transcript.txt").write_text(transcript)
    assert r.returncode == 0, transcript + c.run("journalctl", "-u", UNIT, "-n", "60",
                                                 "--no-pager", check=False).stdout
    assert "found by the network (dht lookup) at http://127.0.0.1:8090" in r.stdout
    assert re.search(r"config /etc/rma-agent/agent.toml: replaced", r.stdout), r.stdout
    # the daemon's own identity was kept, and stays readable by the service user only
    if key_before.strip():
        assert c.sh("sha256sum /var/lib/rma-agent/identity.key") == key_before
    assert c.sh("stat -c '%a %U' /var/lib/rma-agent/identity.key").strip() == "600 rma-agent"
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.run("rma-agent", "check-config", check=False).returncode == 0

    # the coordinator routes a request to the worker's upstream
    code, body = c.curl(f"{COORD_API}/route/files/hello.txt")
    assert (code, body) == (200, "hello from the joined box\n"), (code, body)
    code, body = c.curl(f"{COORD_API}/api/services/files")
    assert code == 200 and [w["name"] for w in json.loads(body)["workers"]] == ["volunteer-1"]

    # again: nothing changes (config bytes, identity, the running process)
    conf, pid = c.read(CONF), c.show(UNIT, "MainPID")
    again = c.run(*argv[:-1], "0", check=False, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "config /etc/rma-agent/agent.toml: unchanged" in again.stdout
    assert "already running with this config" in again.stdout
    assert c.read(CONF) == conf and c.show(UNIT, "MainPID") == pid

    # an edited config is not overwritten without --force
    c.sh(f"sed -i 's/^region = \"\"/region = \"home\"/' {CONF}")
    refused = c.run(*argv[:-1], "0", check=False, timeout=120)
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    c.run("systemctl", "stop", "coord.service", "upstream.service", check=False)
