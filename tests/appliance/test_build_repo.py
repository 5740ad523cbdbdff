"""packaging/build-repo.sh on the host (no container): suites, signatures, refusals.

The booted test (test_repo_upgrade.py) shows apt accepting and refusing what the script
makes; this one pins the repository's shape and the script's own checks in a second, with
small packages made here by dpkg-deb, so it also runs where containers cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.appliance.releases import REPO

SCRIPT = REPO / "packaging" / "build-repo.sh"
TOOLS = ("apt-ftparchive", "gpg", "gpgv", "dpkg-deb")


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and os.environ.get("CI"):
        pytest.fail(f"missing {missing}: packaging/deps.sh installs apt-utils and gnupg")
    if missing:
        pytest.skip(f"missing {missing} (sh packaging/deps.sh)")


def make_deb(dist: Path, version: str) -> Path:
    root = dist.parent / f"pkg-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: rma-agent\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: t <t@example.org>\nDescription: test package\n")
    out = dist / f"rma-agent_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(out)], check=True,
                   capture_output=True)
    return out


def gen_key(tmp: Path, name: str) -> Path:
    home = tmp / f"gpg-{name}"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    try:
        subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.org>",
                        "ed25519", "sign", "never"], check=True, capture_output=True)
        key = tmp / f"{name}.asc"
        key.write_text(subprocess.run([*gpg, "--armor", "--export-secret-keys"], check=True,
                                      capture_output=True, text=True).stdout)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    return key


def build(key: Path, dist: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--key", str(key), "--dist", str(dist),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)


def gpgv(tmp: Path, repo: Path, *files: Path) -> int:
    keyring = tmp / "pub.gpg"
    keyring.write_bytes(subprocess.run(
        ["gpg", "--batch", "--dearmor"], input=(repo / "rma-agent-archive-keyring.asc").read_bytes(),
        capture_output=True, check=True).stdout)
    return subprocess.run(["gpgv", "--keyring", str(keyring), *map(str, files)],
                          capture_output=True).returncode


def test_suites_signatures_and_layout(tools, tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    for v in ("0.2.0-1~deb12u1", "0.2.0-2~deb12u1", "0.2.0-1~deb13u1"):
        make_deb(dist, v)
    key = gen_key(tmp_path, "archive")
    out = tmp_path / "repo"
    r = build(key, dist, out)
    assert r.returncode == 0, r.stdout + r.stderr
    for suite, versions in (("bookworm", ["0.2.0-1~deb12u1", "0.2.0-2~deb12u1"]),
                            ("trixie", ["0.2.0-1~deb13u1"])):
        d = out / "dists" / suite
        packages = (d / "main" / "binary-amd64" / "Packages").read_text()
        assert sorted(ln.split(": ")[1] for ln in packages.splitlines()
                      if ln.startswith("Version: ")) == versions
        for v in versions:
            assert f"Filename: pool/{suite}/main/r/rma-agent/rma-agent_{v}_amd64.deb" in packages
            assert (out / "pool" / suite / "main" / "r" / "rma-agent" /
                    f"rma-agent_{v}_amd64.deb").is_file()
        release = (d / "Release").read_text()
        for field in ("Origin: rma-agent", "Label: rma-agent", f"Suite: {suite}",
                      f"Codename: {suite}", "Architectures: amd64", "Components: main"):
            assert field in release, release
        assert "SHA256:" in release and "MD5Sum:" not in release and "Valid-Until" not in release
        assert gpgv(tmp_path, out, d / "InRelease") == 0
        assert gpgv(tmp_path, out, d / "Release.gpg", d / "Release") == 0
        # A changed Release no longer verifies: its hashes are what pin the packages.
        (d / "Release").write_text(release.replace("Label: rma-agent", "Label: evil"))
        assert gpgv(tmp_path, out, d / "Release.gpg", d / "Release") != 0
    sources = (out / "rma-agent.sources").read_text()
    assert "Signed-By: /etc/apt/keyrings/rma-agent.asc" in sources


def test_refuses_what_it_cannot_place_or_sign(tools, tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    key = gen_key(tmp_path, "archive")
    out = tmp_path / "repo"
    r = build(key, dist, out)
    assert r.returncode != 0 and "no rma-agent_*_amd64.deb" in r.stderr
    odd = make_deb(dist, "0.2.0-1")                     # names no Debian release
    r = build(key, dist, out)
    assert r.returncode != 0 and "names no Debian release" in r.stderr
    odd.unlink()
    make_deb(dist, "0.2.0-1~deb12u1")
    r = subprocess.run(["bash", str(SCRIPT), "--dist", str(dist), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "signing key is needed" in r.stderr
    public_only = tmp_path / "public.asc"
    home = tmp_path / "gpg-archive"
    public_only.write_text(subprocess.run(["gpg", "--batch", "--homedir", str(home), "--armor",
                                           "--export"], capture_output=True, text=True).stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    r = build(public_only, dist, out)
    assert r.returncode != 0 and "no secret key" in r.stderr
    assert not out.exists()                             # nothing half-made was published
    assert build(key, dist, out).returncode == 0
