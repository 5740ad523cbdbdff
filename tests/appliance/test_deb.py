"""What is inside the built .deb (no container needed): paths, modes, control fields."""

from __future__ import annotations

import subprocess

import pytest

# Marked nspawn too: building the package needs the same root + debootstrap'd bookworm
# chroot as the booted test, so `-m "not nspawn"` runs skip the build as well.
pytestmark = [pytest.mark.slow, pytest.mark.nspawn]


def listing(deb) -> dict[str, str]:
    """path -> mode string, from `dpkg-deb -c`."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    files = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        path = parts[5].split(" -> ")[0].removeprefix(".")
        files[path.rstrip("/") or "/"] = parts[0] + " " + parts[1]
    return files


def field(deb, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_layout(deb):
    files = listing(deb)
    for path, mode in {
        "/usr/bin/rma-agent": "lrwxrwxrwx",
        "/opt/rma-agent/bin/rma-agent": "-rwxr-xr-x",
        "/opt/rma-agent/pyvenv.cfg": "-rw-r--r--",
        "/lib/systemd/system/rma-agent.service": "-rw-r--r--",
        "/lib/systemd/system/rma-tunnel.service": "-rw-r--r--",
        "/usr/lib/rma-agent/rma-tunnel": "-rwxr-xr-x",
        "/etc/rma-agent/agent.toml": "-rw-r--r--",
        "/etc/default/rma-agent": "-rw-r--r--",
        "/usr/share/doc/rma-agent/copyright": "-rw-r--r--",
        "/usr/share/doc/rma-agent/changelog.Debian.gz": "-rw-r--r--",
    }.items():
        assert path in files, f"{path} missing from the package"
        assert files[path].startswith(mode), (path, files[path])
        assert files[path].endswith("root/root"), (path, files[path])
    # Compiled kernels for bookworm's python3.11, no bytecode (postinst compiles it).
    assert any(p.startswith("/opt/rma-agent/lib/python3.11/site-packages/_fast/_xor.cpython-311")
               for p in files)
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files)
    assert not any(p.startswith("/opt/rma-agent/include") for p in files)


def test_control(deb):
    assert field(deb, "Package") == "rma-agent"
    assert field(deb, "Architecture") == "amd64"
    depends = field(deb, "Depends")
    for want in ("python3 (>= 3.11)", "python3 (<< 3.12)", "adduser", "systemd", "libc6"):
        assert want in depends, depends
    assert field(deb, "Recommends") == "cloudflared"
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert conffiles == ["/etc/rma-agent/agent.toml", "/etc/default/rma-agent"]
