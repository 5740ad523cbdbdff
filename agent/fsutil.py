"""Atomic file writes for everything the agent keeps in ``state_dir`` (and the operator
tools' output files).

Why one helper: the identity key, the routing snapshot, the last-known-good answers and the
revocation lists are all read back at the next start; a crash or a full disk mid-write must
leave the previous file, never a truncated one. The temporary file is created next to the
target (same filesystem, so the rename is atomic) with its final mode from the start, so a
private key never exists on disk with wider permissions, and it is removed on any failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o600) -> Path:
    """Replace ``path`` with ``data`` (temp file + fsync + rename); returns the path.
    Raises OSError as the filesystem does; the old file is untouched then."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
