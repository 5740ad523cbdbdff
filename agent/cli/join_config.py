"""``rma-agent join``: the config file it writes, and when it may replace one.

What join writes is a complete worker config (every section, so an operator reads it
without the package's commented template) headed by a marker line::

    # join-sha256: <sha256 of everything after this line>

The marker is how join knows, on a later run, that the file is still exactly what it
wrote. The rule for an existing file (``ownership``):

* absent, or byte-identical to the package's default (the conffile ``apt install`` put
  there, known from ``dpkg-query``'s conffile checksum or the source tree's copy):
  written;
* written by join and unedited: replaced when the new text differs, left alone (not even
  rewritten) when it is the same -- running join twice changes nothing;
* anything else (edited since join wrote it, or written by hand): refused (exit 2)
  unless ``--force``, which first copies it to ``<path>.bak-<UTC time>``.

The new text is validated before it replaces anything: written to a temporary file next
to the target, loaded by the config loader and ``check-config``'s admission checks (the
same code ``rma-agent check-config`` runs), then renamed over the target.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.dump import toml_dumps

MARKER = "# join-sha256: "
SOURCE_DEFAULT = Path(__file__).resolve().parents[2] / "config" / "agent.toml"
PACKAGE = "rma-agent"


class JoinError(Exception):
    """A failure join reports as one line; ``code`` is the exit code (SPEC §3)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Upstream:
    """One service the worker serves: its local server and (when known) its kind."""

    url: str
    kind: str = ""
    health: str = ""


@dataclass(frozen=True)
class JoinPlan:
    """Everything the written config depends on (nothing else: same plan, same bytes)."""

    coordinator: str                     # the URL given to join, without trailing slash
    name: str
    services: Mapping[str, Upstream]
    state_dir: str = "/var/lib/rma-agent"
    region: str = ""
    endpoint: str = ""                   # "" = learned from the tunnel
    tunnel: str = "quick"
    admission_cert: str = ""             # closed networks: the file enrollment wrote
    admission_keys: tuple[str, ...] = ()
    dht_listen: str = "0.0.0.0:8468"
    dht_mode: str = "auto"
    http_listen: str = "127.0.0.1:8080"
    gateway_listen: str = "127.0.0.1:8090"
    allow_http_hosts: tuple[str, ...] = ()
    allow_private_hosts: tuple[str, ...] = ()
    extra: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


def kind_supported() -> bool:
    """Whether this version's config accepts ``kind`` in an upstream table (otherwise
    join writes the kind's health path instead)."""
    from agent.config import model
    return "kind" in getattr(model, "UPSTREAM_KEYS", ())


def _upstream_value(up: Upstream) -> object:
    table: dict[str, str] = {"url": up.url}
    if up.kind and kind_supported():
        table["kind"] = up.kind
    elif up.health:
        table["health"] = up.health
    return up.url if len(table) == 1 else table


def render(plan: JoinPlan, path: Path) -> str:
    """The config text for ``plan``, marker line included."""
    sections: dict[str, dict[str, object]] = {
        "agent": {"role": "worker", "name": plan.name, "region": plan.region,
                  "state_dir": plan.state_dir},
        "dht": {"listen": plan.dht_listen,
                "bootstrap": [plan.coordinator + "/api/dht/bootstrap"],
                "mode": plan.dht_mode},
        "http": {"listen": plan.http_listen},
        "gateway": {"listen": plan.gateway_listen},
        "gateway.upstreams": {name: _upstream_value(up) for name, up in plan.services.items()},
        "worker": {"services": list(plan.services), "endpoint": plan.endpoint,
                   "admission_cert": plan.admission_cert},
        "network": {"admission_keys": list(plan.admission_keys)},
        "tunnel": {"mode": plan.tunnel},
        "discovery": {"coordinators": [plan.coordinator],
                      "allow_http_hosts": list(plan.allow_http_hosts),
                      "allow_private_hosts": list(plan.allow_private_hosts)},
    }
    for name, values in plan.extra.items():
        sections.setdefault(name, {}).update(values)
    body = toml_dumps(sections)
    head = (f"# {path}: written by `rma-agent join {plan.coordinator}`.\n"
            "# Every key and its default: /usr/share/doc/rma-agent (or `man rma-agent`).\n"
            "# Once this file is edited, `rma-agent join` refuses to overwrite it without\n"
            "# --force (which keeps a backup). Check and apply edits with:\n"
            "#   rma-agent check-config && systemctl reload rma-agent\n")
    return f"{head}{MARKER}{digest(body)}\n{body}"


def digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _packaged_default_md5s(path: Path) -> set[str]:
    """md5 sums of the package's default for ``path``: dpkg's conffile record (what
    ``apt install`` put there), and the source tree's copy when run from a checkout."""
    sums: set[str] = set()
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}\n", PACKAGE],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == str(path):
            sums.add(parts[1])
    try:
        sums.add(hashlib.md5(SOURCE_DEFAULT.read_bytes()).hexdigest())
    except OSError:
        pass
    return sums


def ownership(path: Path) -> str:
    """``absent`` | ``default`` (the package's, untouched) | ``ours`` (join's, unedited)
    | ``edited`` (join's, changed since) | ``foreign`` (someone else's)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "absent"
    lines = data.decode("utf-8", "replace").split("\n")
    for i, line in enumerate(lines[:12]):
        if line.startswith(MARKER):
            body = "\n".join(lines[i + 1:])
            return "ours" if line[len(MARKER):].strip() == digest(body) else "edited"
    if hashlib.md5(data).hexdigest() in _packaged_default_md5s(path):
        return "default"
    return "foreign"


@dataclass(frozen=True)
class WriteResult:
    action: str                  # "unchanged" | "written" | "replaced"
    backup: Path | None = None


def validate_text(path: Path, text: str) -> None:
    """Load ``text`` as the config at ``path`` would be and run check-config's
    admission checks; JoinError(2) with every error line when it is not valid."""
    from agent.cli.admission import check_config_admission
    from agent.config import ConfigError, parse_config

    try:
        cfg = parse_config(text, path)
    except ConfigError as exc:
        raise JoinError("the config join made is not valid (a bug, please report it):\n"
                        + "\n".join(exc.errors), 2) from None
    errors, _warnings = check_config_admission(cfg, path)
    if errors:
        raise JoinError("\n".join(errors), 2)


def check_writable(path: Path, *, force: bool) -> str:
    """``ownership(path)``; JoinError(2) when the rule forbids replacing it. join asks
    this before anything else, so a refusal costs no enrollment token."""
    state = ownership(path)
    if state in ("edited", "foreign") and not force:
        why = ("was edited since `rma-agent join` wrote it" if state == "edited"
               else "was not written by `rma-agent join`")
        raise JoinError(f"{path} {why}: refusing to overwrite it (run again with "
                        "--force to replace it; a backup is kept)", 2)
    return state


def write_config(path: Path, text: str, *, force: bool) -> WriteResult:
    """Write ``text`` to ``path`` by the ownership rule above (module docstring)."""
    state = check_writable(path, force=force)
    if state == "ours" and path.read_text("utf-8", "replace") == text:
        return WriteResult("unchanged")
    backup = None
    if state in ("edited", "foreign"):
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        shutil.copy2(path, backup)
    validate_text(path, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    from agent.fsutil import write_atomic
    write_atomic(path, text.encode("utf-8"), mode=0o644)
    return WriteResult("written" if state == "absent" else "replaced", backup)
