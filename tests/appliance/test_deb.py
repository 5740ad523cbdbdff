"""What is inside the built .debs (no container needed): paths, modes, control fields,
lintian, for each release (bookworm and trixie)."""

from __future__ import annotations

import subprocess

import pytest

from tests.appliance.releases import PYTHON_MINOR, RELEASES, deb_version

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


@pytest.fixture(params=RELEASES)
def release(request) -> str:
    return request.param


def test_layout(debs, release):
    deb = debs[release]
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
    # Compiled kernels for the release's own python3, no bytecode (postinst compiles it).
    minor = PYTHON_MINOR[release]
    tag = minor.replace(".", "")
    assert any(p.startswith(f"/opt/rma-agent/lib/python{minor}/site-packages/_fast/"
                            f"_xor.cpython-{tag}") for p in files)
    assert not any(p.startswith("/opt/rma-agent/lib/python3.") and
                   not p.startswith(f"/opt/rma-agent/lib/python{minor}") for p in files)
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files)
    assert not any(p.startswith("/opt/rma-agent/include") for p in files)


def test_control(debs, release):
    deb = debs[release]
    assert field(deb, "Package") == "rma-agent"
    assert field(deb, "Architecture") == "amd64"
    assert field(deb, "Version") == deb_version(release)
    depends = field(deb, "Depends")
    major, minor = PYTHON_MINOR[release].split(".")
    for want in (f"python3 (>= {major}.{minor})", f"python3 (<< {major}.{int(minor) + 1})",
                 "adduser", "systemd", "libc6"):
        assert want in depends, depends
    assert field(deb, "Recommends") == "cloudflared"
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert conffiles == ["/etc/rma-agent/agent.toml", "/etc/default/rma-agent"]


def test_versions_sort_across_releases(debs):
    """bookworm's build < trixie's build < the next revision of either (dpkg's order), so a
    box moving to trixie gets the trixie build and a new revision upgrades both."""
    def lt(a: str, b: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0

    b1, t1 = deb_version("bookworm"), deb_version("trixie")
    assert lt(b1, t1)
    assert lt(t1, deb_version("bookworm", 2)) and lt(b1, deb_version("bookworm", 2))
    assert lt(b1, b1.split("~")[0])  # below the plain revision (as Debian's own ~debNNuM)


def test_lintian_clean(debs, release):
    """build-deb.sh fails on lintian errors and keeps lintian's full output next to the
    package: no warnings either (every accepted tag is an override that says why)."""
    deb = debs[release]
    report = deb.parent / f".{deb.stem}.lintian"
    assert report.is_file(), f"no lintian report {report} (built with --no-lintian?)"
    text = report.read_text()
    print(f"lintian {deb.name}: {text.strip() or 'clean'}")
    assert text.strip() == "", text
