"""The parser: TOML text -> validated ``Config`` (``parse_config``, ``load_config``).

Reads every section with its reader from ``sections`` (in a fixed order: a reader that
cross-checks another section runs after it), and raises one ``ConfigError`` listing
every problem, sorted by line.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from agent.config.locator import _Locator
from agent.config.model import SCHEMA, Config, ConfigError
from agent.config.sections import (
    agent_section,
    dht_section,
    discovery_section,
    gateway_section,
    http_section,
    log_section,
    network_section,
    tunnel_section,
    worker_section,
)
from agent.config.validate import _Checker, _did_you_mean

_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)\s*$")


def parse_config(text: str, path: Path | str = "<config>", *,
                 base_dir: Path | None = None) -> Config:
    """Validate TOML ``text`` (as if read from ``path``); raise ``ConfigError``.

    ``base_dir`` anchors a relative ``agent.state_dir`` (default: the file's directory).
    """
    spath = str(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_error(spath, text, str(e))]) from None
    ck = _Checker(spath, _Locator(text))
    _unknown_sections(ck, doc)
    agent = agent_section(ck, doc, spath, base_dir)
    dht = dht_section(ck, doc)
    http = http_section(ck, doc)
    worker = worker_section(ck, doc, agent.role, spath, base_dir)
    network = network_section(ck, doc, agent.role, spath, base_dir)
    tunnel = tunnel_section(ck, doc, agent.role, worker.endpoint, http.listen)
    # [gateway] after [worker] and [tunnel]: upstreams name worker services, and the
    # listen address must not collide with the other listeners.
    gateway = gateway_section(ck, doc, agent.role, worker.services, http.listen,
                              tunnel.metrics)
    discovery = discovery_section(ck, doc)
    log = log_section(ck, doc)
    if ck.errors:
        raise ConfigError(ck.sorted())
    return Config(agent=agent, dht=dht, http=http, gateway=gateway, worker=worker,
                  network=network, tunnel=tunnel, discovery=discovery, log=log,
                  source=Path(spath) if spath != "<config>" else None)


def _unknown_sections(ck: _Checker, doc: dict[str, Any]) -> None:
    """Report top-level names that are not sections (with a close spelling if any)."""
    for name, value in doc.items():
        if name not in SCHEMA:
            kind = "section" if isinstance(value, dict) else "key"
            ck.err((name,), f"unknown {kind}" + _did_you_mean(name, tuple(SCHEMA)))


def _syntax_error(path: str, text: str, msg: str) -> str:
    m = _TOML_POS_RE.search(msg)
    if m:
        line = int(m.group(1))
    else:
        # "(at end of document)": the scanner tells where an unterminated value began;
        # otherwise the last non-blank line is where the document went wrong.
        loc = _Locator(text)
        if loc.eof_pos is not None:
            line = loc.line_of_pos(loc.eof_pos)
        else:
            lines = text.rstrip().splitlines()
            line = max(1, len(lines))
    if msg.startswith(("Cannot overwrite a value", "Cannot declare", "Duplicate")):
        msg += " - a key or table is defined twice"
    return f"{path}:{line}: syntax: {msg}"


def load_config(path: Path | str) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}:0: file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}:0: file: not valid UTF-8 (byte 0x{data[e.start]:02x} "
                           f"at offset {e.start})"]) from None
    return parse_config(text, path, base_dir=p.resolve().parent)
