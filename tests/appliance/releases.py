"""The Debian releases the package is built for, and what build-deb.sh names each build.

Plain data and functions (no fixtures), shared by conftest.py and the tests.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
RELEASES = ("bookworm", "trixie")
DEBIAN_NUMBER = {"bookworm": 12, "trixie": 13}
PYTHON_MINOR = {"bookworm": "3.11", "trixie": "3.13"}


def upstream_version() -> str:
    """The project version (pyproject.toml), which every package version starts with."""
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version") and "=" in line:
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no version in pyproject.toml")


def deb_version(release: str, revision: int = 1) -> str:
    """What packaging/build-deb.sh names a build: 0.2.0-1~deb12u1, 0.2.0-1~deb13u1, ..."""
    return f"{upstream_version()}-{revision}~deb{DEBIAN_NUMBER[release]}u1"


def deb_path(release: str, revision: int = 1, out: Path = DIST) -> Path:
    return out / f"rma-agent_{deb_version(release, revision)}_amd64.deb"
