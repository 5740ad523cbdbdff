"""Atomic file writes (and the one private-key file read) for everything the agent keeps in ``state_dir`` (and the operator
tools' output files).

Why one helper: the identity key, the routing snapshot, the last-known-good answers and the
revocation lists are all read back at the next start; a crash or a full disk mid-write must
leave the previous file, never a truncated one. The temporary file is created next to the
target (same filesystem, so the rename is atomic) with its final mode from the start, so a
private key never exists on disk with wider permissions, and it is removed on any failure.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class PrivateFileError(ValueError):
    """A private file (a key) is missing, not a regular file, readable by other users, or
    unreadable; the message names the path and what to do."""


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


def read_private_file(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of a private key file, refused when other users may read it (anyone
    holding the key can act as its owner: forge a worker's records, admit workers) or when
    it is larger than ``limit`` bytes. ``what`` names the key in the error."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise PrivateFileError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} let "
                                   f"other users read the {what}; run 'chmod 600 {path}'")
        if st.st_size > limit:
            raise PrivateFileError(f"{path}: too large for a {what}")
        return path.read_bytes()
    except FileNotFoundError:
        raise PrivateFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise PrivateFileError(f"{path}: {exc.strerror or exc}") from None
