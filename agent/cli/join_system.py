"""``rma-agent join``: what it does to the box itself -- the identity and state files
(owned by the service user, so the daemon can read and renew them) and the systemd unit.

Why ownership matters: join runs as root (``sudo``), the daemon as the unprivileged
``rma-agent`` user (``User=`` in rma-agent.service) with ``state_dir`` as its only
writable directory (``StateDirectory=``, ``ProtectSystem=strict``). A key or certificate
left owned by root would be unreadable (0600) or unreplaceable by the daemon's renewal,
so everything join creates in ``state_dir`` is handed to that user.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from agent.cli.join_config import JoinError
from agent.dht.identity import KEY_FILE, Identity, IdentityError
from agent.fsutil import write_atomic

SERVICE_USER = "rma-agent"
UNIT = "rma-agent.service"
SYSTEMCTL_TIMEOUT = 120.0


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def service_owner(state_dir: Path) -> tuple[int, int] | None:
    """(uid, gid) files in ``state_dir`` must belong to, or None (not root: they are
    ours already). The package's service user when it exists, else the directory's
    owner."""
    if not _is_root():
        return None
    try:
        pw = pwd.getpwnam(SERVICE_USER)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        pass
    try:
        st = state_dir.stat()
    except OSError:
        return None
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


def _give(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)


def ensure_identity(state_dir: Path) -> tuple[Identity, bool]:
    """This box's identity (created when missing, as ``run`` would at first start);
    (identity, created). The same key on every later run: join is idempotent."""
    owner = service_owner(state_dir)
    key = state_dir / KEY_FILE
    try:
        if not state_dir.exists():
            state_dir.mkdir(mode=0o700, parents=True)
            _give(state_dir, owner)
        created = not key.exists()
        ident = Identity.load_or_create(state_dir)
        if created:
            _give(key, owner)
        return ident, created
    except IdentityError as exc:
        raise JoinError(f"identity: {exc} (run as root: sudo rma-agent join ...)", 1) from None
    except PermissionError as exc:
        raise JoinError(f"{exc.filename or key}: permission denied (run as root: "
                        "sudo rma-agent join ...)", 1) from None


def write_state_file(state_dir: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    """``state_dir/name`` written atomically and handed to the service user."""
    path = state_dir / name
    try:
        write_atomic(path, data, mode=mode)
    except OSError as exc:
        raise JoinError(f"{path}: {exc.strerror or exc}", 1) from None
    _give(path, service_owner(state_dir))
    return path


def systemd_running() -> bool:
    """Whether systemd is PID 1 here (sd_booted()'s test)."""
    return Path("/run/systemd/system").is_dir()


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise JoinError(f"systemctl {' '.join(args)}: {exc}", 1) from None


def start_unit(config_changed: bool) -> str:
    """Enable the unit and make it run the config join wrote: restarted when the config
    changed (or it is not running), left alone otherwise. What was done, as a phrase."""
    if not systemd_running():
        raise JoinError("systemd is not running on this box: start the agent yourself "
                        "(rma-agent run) or pass --no-start", 1)
    r = _systemctl("enable", "--quiet", UNIT)
    if r.returncode != 0:
        raise JoinError(f"systemctl enable {UNIT} failed: {r.stderr.strip()}", 1)
    active = _systemctl("is-active", "--quiet", UNIT).returncode == 0
    if active and not config_changed:
        return f"{UNIT} enabled, already running with this config"
    # Type=notify: restart returns once the agent said READY=1 (or failed)
    r = _systemctl("restart", UNIT)
    if r.returncode != 0:
        raise JoinError(f"systemctl restart {UNIT} failed: {r.stderr.strip()} "
                        f"(see: journalctl -u {UNIT} -n 50)", 1)
    return f"{UNIT} enabled and {'restarted' if active else 'started'}"
