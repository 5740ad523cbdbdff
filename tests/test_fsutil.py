"""write_atomic: the file is replaced whole or not at all, with its mode from the start."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.fsutil import PrivateFileError, read_private_file, write_atomic


def test_creates_and_replaces_with_the_mode(tmp_path: Path) -> None:
    p = tmp_path / "identity.key"
    write_atomic(p, b"one", mode=0o600)
    assert p.read_bytes() == b"one" and stat.S_IMODE(p.stat().st_mode) == 0o600
    write_atomic(p, b"two", mode=0o644)
    assert p.read_bytes() == b"two" and stat.S_IMODE(p.stat().st_mode) == 0o644
    assert sorted(x.name for x in tmp_path.iterdir()) == ["identity.key"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "routing.json"
    write_atomic(p, b"good")
    with pytest.raises(TypeError):
        write_atomic(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"good"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["routing.json"]


def test_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_atomic(tmp_path / "nope" / "x", b"x")


def test_a_private_file_is_read_only_when_no_one_else_may(tmp_path: Path) -> None:
    """The one rule both key files (identity, network key) are read by."""
    p = tmp_path / "k"
    write_atomic(p, b"secret", mode=0o600)
    assert read_private_file(p, "key", 64) == b"secret"
    p.chmod(0o640)
    with pytest.raises(PrivateFileError, match="0640 let other users read the key; run 'chmod"):
        read_private_file(p, "key", 64)
    p.chmod(0o600)
    with pytest.raises(PrivateFileError, match="too large for a key"):
        read_private_file(p, "key", 3)
    with pytest.raises(PrivateFileError, match="no such file"):
        read_private_file(tmp_path / "missing", "key", 64)
    with pytest.raises(PrivateFileError, match="not a regular file"):
        read_private_file(tmp_path, "key", 64)
