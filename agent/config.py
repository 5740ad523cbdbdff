"""Typed, frozen configuration of one agent, loaded from TOML (SPEC §4).

This module is the contract every other module codes against: the dataclasses below
are what ``load_config`` returns. Validation reports *all* errors at once, each as
``PATH:LINE: section.key: message`` (see ``ConfigError``).
"""

from __future__ import annotations

import bisect
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.dht import record as rec

DEFAULT_PATH = Path("/etc/rma-agent/agent.toml")
ENV_PATH = "RMA_AGENT_CONFIG"

# GPU class table, best first. Scores are in [0, 1]; unknown names fall back to memory.
DEFAULT_GPU_SCORES: dict[str, float] = {
    "H200": 1.0, "H100": 0.9, "A100": 0.8, "L40S": 0.7, "A10": 0.6,
    "V100": 0.5, "RTX 4090": 0.4, "RTX 3090": 0.3, "T4": 0.2, "CPU": 0.0,
}


@dataclass(frozen=True)
class Address:
    """A ``host:port`` pair; host may be an IPv4/IPv6 literal or a name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentSection:
    role: str = "worker"                   # "worker" | "coordinator"
    name: str = field(default_factory=socket.gethostname)
    region: str = ""
    state_dir: Path = Path("/var/lib/rma-agent")


@dataclass(frozen=True)
class DHTSection:
    listen: Address = Address("0.0.0.0", 8468)
    bootstrap: tuple[str, ...] = ()        # "ip:port", "host:port" or "https://.../api/dht/bootstrap"
    mode: str = "auto"                     # "server" | "client" | "auto"
    ksize: int = 20
    alpha: int = 3
    record_ttl: int = 300
    republish_interval: int = 30


@dataclass(frozen=True)
class HTTPSection:
    listen: Address = Address("127.0.0.1", 8080)


@dataclass(frozen=True)
class WorkerSection:
    services: tuple[str, ...] = ()
    endpoint: str = ""                     # public base URL; "" = learned from the tunnel
    max_concurrency: int = 4
    gpu: str | None = None                 # None = detect through NVML
    gpu_memory_gb: float | None = None


@dataclass(frozen=True)
class TunnelSection:
    mode: str = "off"                      # "off" | "quick" | "named"
    metrics: Address = Address("127.0.0.1", 20241)
    hostname: str = ""


@dataclass(frozen=True)
class DiscoverySection:
    cache_ttl: int = 60
    coordinators: tuple[str, ...] = ()
    max_results: int = 50
    gpu_scores: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GPU_SCORES))


@dataclass(frozen=True)
class LogSection:
    level: str = "info"                    # debug | info | warning | error


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    dht: DHTSection = field(default_factory=DHTSection)
    http: HTTPSection = field(default_factory=HTTPSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    tunnel: TunnelSection = field(default_factory=TunnelSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None             # file it was loaded from, if any


class ConfigError(Exception):
    """One or more configuration errors; ``errors`` holds lines ``PATH:LINE: key: msg``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def default_path() -> Path:
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


# --------------------------------------------------------------------------------------
# Loading and validation
#
# Why a hand-written validator and not a schema library: the product promises one line
# per error, *every* error at once, with the file's line number and a "did you mean";
# no schema library in the dependency set gives line numbers for TOML (tomllib does not
# keep positions), so ``_Locator`` re-scans the already-parsed text for them.
# --------------------------------------------------------------------------------------

ROLES = ("worker", "coordinator")
DHT_MODES = ("server", "client", "auto")
TUNNEL_MODES = ("off", "quick", "named")
LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)\s*$")

KeyPath = tuple[str | int, ...]

# Known keys per section; the order is the order ``dump_toml`` writes them in.
SCHEMA: dict[str, tuple[str, ...]] = {
    "agent": ("role", "name", "region", "state_dir"),
    "dht": ("listen", "bootstrap", "mode", "ksize", "alpha", "record_ttl", "republish_interval"),
    "http": ("listen",),
    "worker": ("services", "endpoint", "max_concurrency", "gpu", "gpu_memory_gb"),
    "tunnel": ("mode", "metrics", "hostname"),
    "discovery": ("cache_ttl", "coordinators", "max_results", "gpu_scores"),
    "log": ("level",),
}


def _render_key(path: KeyPath) -> str:
    """``("discovery", "gpu_scores", "RTX 4090")`` -> ``discovery.gpu_scores."RTX 4090"``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _BARE_KEY_RE.fullmatch(part):
            out.append(("." if out else "") + part)
        else:
            out.append(("." if out else "") + _toml_str(part))
    return "".join(out)


def _toml_str(s: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, except DEL must be escaped too)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _kind(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return "a date/time"


def _show(v: object) -> str:
    """How a bad value is echoed back: TOML spelling, plus its type when that is the issue."""
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean)"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        s = _toml_str(v)
        return s if len(s) <= 80 else s[:77] + '..."'
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return f"{v} ({_kind(v)})"


def _got(v: object) -> str:
    """A wrong-typed value echoed back with its TOML type when the spelling alone is unclear."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return f"{_show(v)} ({_kind(v)})"
    return _show(v)


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...], here: str = "") -> str:
    """Hint for an unknown name: a close spelling, else the section it belongs in, else
    the list of known names. ``here`` is the section the word was found in ("" = top)."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f", did you mean '{close[0]}'?"
    homes = [sec for sec, keys in SCHEMA.items() if word in keys and sec != here]
    if homes:
        return f": '{word}' belongs in [{homes[0]}]"
    return f" (known: {', '.join(choices)})"


# ---- locating keys in the raw text ----------------------------------------------------


class _Eof(Exception):
    """The scanner ran off the end of the text inside a value that started at ``pos``."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class _Locator:
    """Maps key paths to 1-based line numbers by scanning the TOML text.

    Records table headers (``[dht]``, ``[discovery.gpu_scores]``), ``key =`` lines
    (dotted keys too), keys of inline tables and elements of arrays (path + index), so
    an error in the third bootstrap entry of a multi-line array points at its own line.
    It is meant for text tomllib has accepted; on broken text it stops quietly (or
    reports where an unterminated value began, see ``_Eof``).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self._nl = [m.start() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {}
        self.seen: list[tuple[KeyPath, int]] = []   # every definition, in order
        self.eof_pos: int | None = None
        try:
            self._document()
        except _Eof as e:
            self.eof_pos = e.pos
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass

    # -- public
    def line_of_pos(self, pos: int) -> int:
        return bisect.bisect_right(self._nl, pos - 1) + 1 if pos > 0 else 1

    def line(self, *paths: KeyPath) -> int:
        """Line of the first path (or nearest recorded parent) found; else 1."""
        for path in paths:
            if path in self.lines:
                return self.lines[path]
        for path in paths:
            for n in range(len(path) - 1, 0, -1):
                if path[:n] in self.lines:
                    return self.lines[path[:n]]
        return 1

    # -- scanner
    def _record(self, path: KeyPath, pos: int) -> None:
        line = self.line_of_pos(pos)
        self.lines.setdefault(path, line)
        self.seen.append((path, line))

    def _ws(self, i: int, newlines: bool) -> int:
        t = self.text
        while i < self.n:
            c = t[i]
            if c in " \t" or (newlines and c in "\r\n"):
                i += 1
            elif c == "#" and newlines:
                j = t.find("\n", i)
                i = self.n if j < 0 else j
            else:
                break
        return i

    def _simple_key(self, i: int) -> tuple[str, int]:
        t = self.text
        m = _BARE_KEY_RE.match(t, i)
        if m:
            return m.group(0), m.end()
        if t.startswith('"', i) or t.startswith("'", i):
            end = self._string(i, i)
            # Let tomllib decode the escapes rather than re-implementing them.
            return tomllib.loads("k = " + t[i:end])["k"], end
        raise ValueError("not a key")

    def _key(self, i: int) -> tuple[tuple[str, ...], int]:
        parts: list[str] = []
        while True:
            i = self._ws(i, False)
            k, i = self._simple_key(i)
            parts.append(k)
            i = self._ws(i, False)
            if i < self.n and self.text[i] == ".":
                i += 1
                continue
            return tuple(parts), i

    def _string(self, i: int, start: int) -> int:
        """End index (exclusive) of the string starting at ``i``."""
        t = self.text
        for q in ('"""', "'''"):
            if t.startswith(q, i):
                j = i + 3
                while True:
                    k = t.find(q, j)
                    if k < 0:
                        raise _Eof(start)
                    if q == '"""':
                        # An odd run of backslashes before k escapes the first quote.
                        b = k
                        while b > j and t[b - 1] == "\\":
                            b -= 1
                        if (k - b) % 2 == 1:
                            j = k + 1
                            continue
                    end = k + 3
                    while end < self.n and t[end] == q[0] and end - k < 5:
                        end += 1
                    return end
        q = t[i]
        j = i + 1
        while j < self.n:
            c = t[j]
            if c == "\\" and q == '"':
                j += 2
                continue
            if c == q:
                return j + 1
            if c == "\n":
                raise _Eof(start)
            j += 1
        raise _Eof(start)

    def _value(self, i: int, path: KeyPath) -> int:
        t = self.text
        if i >= self.n:
            raise _Eof(i)
        c = t[i]
        if c in "\"'":
            return self._string(i, i)
        if c == "[":
            start, i, idx = i, i + 1, 0
            while True:
                i = self._ws(i, True)
                if i >= self.n:
                    raise _Eof(start)
                if t[i] == "]":
                    return i + 1
                self._record((*path, idx), i)
                i = self._ws(self._value(i, (*path, idx)), True)
                if i < self.n and t[i] == ",":
                    i += 1
                    idx += 1
                elif i < self.n and t[i] == "]":
                    return i + 1
                else:
                    raise _Eof(start)
        if c == "{":
            start, i = i, i + 1
            while True:
                i = self._ws(i, False)
                if i >= self.n or t[i] == "\n":
                    raise _Eof(start)
                if t[i] == "}":
                    return i + 1
                if t[i] == ",":
                    i += 1
                    continue
                kpos = i
                keys, i = self._key(i)
                self._record((*path, *keys), kpos)
                i = self._ws(i, False)
                if i >= self.n or t[i] != "=":
                    raise ValueError("expected =")
                i = self._value(self._ws(i + 1, False), (*path, *keys))
        m = re.compile(r"[^,\]}\n#]*").match(t, i)
        assert m is not None
        return max(m.end(), i + 1)

    def _document(self) -> None:
        t = self.text
        table: tuple[str, ...] = ()
        i = 0
        while True:
            i = self._ws(i, True)
            if i >= self.n:
                return
            if t[i] == "[":
                hpos = i
                aot = t.startswith("[[", i)
                keys, i = self._key(i + (2 if aot else 1))
                table = keys
                self._record(table, hpos)
                i = self._ws(i, False)
                i += 2 if aot else 1
                continue
            kpos = i
            keys, i = self._key(i)
            self._record((*table, *keys), kpos)
            i = self._ws(i, False)
            if i >= self.n or t[i] != "=":
                raise ValueError("expected =")
            i = self._value(self._ws(i + 1, False), (*table, *keys))


# ---- validation -----------------------------------------------------------------------


class _Checker:
    """Collects errors as (line, order, text) while reading a parsed document."""

    def __init__(self, path: str, locator: _Locator) -> None:
        self.path = path
        self.loc = locator
        self.errors: list[tuple[int, int, str]] = []

    def err(self, key: KeyPath, msg: str, *fallback: KeyPath, at: KeyPath | None = None) -> None:
        """Record ``msg`` for ``key``, on the line of ``at`` (exactly, e.g. one array
        entry) if recorded, else of ``key``, the fallbacks, or their nearest parents."""
        line = self.loc.lines.get(at) if at is not None else None
        line = line or self.loc.line(key, *fallback)
        self.errors.append((line, len(self.errors), f"{self.path}:{line}: {_render_key(key)}: {msg}"))

    def sorted(self) -> list[str]:
        return [e for _, _, e in sorted(self.errors)]

    # -- scalar readers: return the value, or None after recording an error
    def integer(self, sec: dict[str, Any], key: KeyPath, default: int, lo: int,
                hi: int | None = None) -> int:
        name = str(key[-1])
        if name not in sec:
            return default
        v = sec[name]
        want = (f"must be an integer between {lo} and {hi}" if hi is not None
                else f"must be an integer >= {lo}")
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(key, f"{want}, got {_got(v)}")
            return default
        if v < lo or (hi is not None and v > hi):
            self.err(key, f"{want}, got {v}")
            return default
        return v

    def number(self, v: object, key: KeyPath, lo: float, hi: float | None) -> float | None:
        want = (f"must be a number between {lo:g} and {hi:g}" if hi is not None
                else f"must be a number >= {lo:g}")
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.err(key, f"{want}, got {_got(v)}")
            return None
        f = float(v)
        if not math.isfinite(f) or f < lo or (hi is not None and f > hi):
            self.err(key, f"{want}, got {v!r}")
            return None
        return f

    def string(self, sec: dict[str, Any], key: KeyPath, default: str, *,
               max_len: int = 256, allow_empty: bool = True) -> str:
        name = str(key[-1])
        if name not in sec:
            return default
        v = sec[name]
        if not isinstance(v, str):
            self.err(key, f"must be a string, got {_got(v)}")
            return default
        if not allow_empty and not v.strip():
            self.err(key, "must not be empty")
            return default
        if len(v) > max_len:
            self.err(key, f"must be at most {max_len} characters, got {len(v)}")
            return default
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            self.err(key, f"must not contain control characters, got {_show(v)}")
            return default
        return v

    def choice(self, sec: dict[str, Any], key: KeyPath, default: str,
               choices: tuple[str, ...]) -> str:
        name = str(key[-1])
        if name not in sec:
            return default
        v = sec[name]
        listed = ", ".join(f'"{c}"' for c in choices)
        if not isinstance(v, str):
            self.err(key, f"must be one of {listed}, got {_got(v)}")
            return default
        if v.lower() in choices:
            return v.lower()
        close = difflib.get_close_matches(v.lower(), list(choices), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else ""
        self.err(key, f"must be one of {listed}, got {_show(v)}{hint}")
        return default

    def string_list(self, sec: dict[str, Any], key: KeyPath,
                    example: str) -> list[tuple[KeyPath, str]] | None:
        """The array's strings with their own key paths (for per-entry line numbers)."""
        name = str(key[-1])
        if name not in sec:
            return None
        v = sec[name]
        if not isinstance(v, list):
            self.err(key, f"must be an array of strings, e.g. [{_toml_str(example)}], "
                          f"got {_got(v)}")
            return None
        out: list[tuple[KeyPath, str]] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.err(key, f"entry {i + 1} must be a string, got {_got(item)}",
                         at=(*key, i))
            else:
                out.append(((*key, i), item))
        return out


def check_host(host: str) -> str | None:
    """Why ``host`` is not an IPv4 literal or a DNS name, or None when it is fine."""
    if not host:
        return "the host is empty"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not a valid IPv4 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(p) for p in name.split(".")):
        return f"{host!r} is not a valid host name"
    return None


def parse_address(s: str) -> Address:
    """``host:port``, ``[v6]:port`` -> Address; raises ValueError saying what is wrong."""
    s = s.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise ValueError('an IPv6 address is written "[addr]:port"')
        host, port_s = s[1:end], s[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    else:
        if ":" not in s:
            raise ValueError('must be "host:port"')
        host, port_s = s.rsplit(":", 1)
        if ":" in host:
            raise ValueError('an IPv6 address needs brackets: "[addr]:port"')
        why = check_host(host)
        if why:
            raise ValueError(why)
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError("the port must be a number between 1 and 65535")
    return Address(host, int(port_s))


def check_url(s: str, *, https_only: bool = False) -> str | None:
    """Why ``s`` is not an http(s) URL with a host (None when it is fine)."""
    try:
        u = urllib.parse.urlsplit(s)
        port = u.port
    except ValueError as e:
        return f"is not a valid URL ({e})"
    schemes = ("https",) if https_only else ("http", "https")
    if u.scheme not in schemes:
        return "must start with " + " or ".join(f"{x}://" for x in schemes)
    if any(c.isspace() for c in s):
        return "must not contain spaces"
    if not u.hostname:
        return "has no host"
    if u.username is not None or u.password is not None:
        return "must not contain a user name or password"
    if port == 0:
        return "the port must be between 1 and 65535"
    if ":" not in u.hostname:
        why = check_host(u.hostname)
        if why:
            return why
    if u.fragment:
        return "must not contain a #fragment"
    return None


def _address(ck: _Checker, sec: dict[str, Any], key: KeyPath, default: Address) -> Address:
    name = str(key[-1])
    if name not in sec:
        return default
    v = sec[name]
    if not isinstance(v, str):
        ck.err(key, f'must be a "host:port" string, got {_got(v)}')
        return default
    try:
        return parse_address(v)
    except ValueError as e:
        ck.err(key, f"{e}, got {_show(v)}")
        return default


def _section(ck: _Checker, doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The section's table (or {} when absent/bad), with unknown keys reported."""
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        ck.err((name,), f"must be a table ([{name}]), got {_got(sec)}")
        return {}
    for key in sec:
        if key not in SCHEMA[name]:
            ck.err((name, key), "unknown key" + _did_you_mean(key, SCHEMA[name], name))
    return sec


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
    loc = _Locator(text)
    ck = _Checker(spath, loc)

    for name, value in doc.items():
        if name not in SCHEMA:
            kind = "section" if isinstance(value, dict) else "key"
            ck.err((name,), f"unknown {kind}" + _did_you_mean(name, tuple(SCHEMA)))

    # [agent]
    s = _section(ck, doc, "agent")
    role = ck.choice(s, ("agent", "role"), "worker", ROLES)
    name = ck.string(s, ("agent", "name"), "", max_len=rec.MAX_NAME, allow_empty=False) or socket.gethostname()
    region = ck.string(s, ("agent", "region"), "", max_len=rec.MAX_REGION)
    state_raw = ck.string(s, ("agent", "state_dir"), "/var/lib/rma-agent", max_len=4096,
                          allow_empty=False)
    state_dir = Path(state_raw).expanduser()
    if not state_dir.is_absolute():
        anchor = base_dir if base_dir is not None else (
            Path(spath).resolve().parent if spath != "<config>" else Path.cwd())
        state_dir = anchor / state_dir
    agent = AgentSection(role=role, name=name, region=region,
                         state_dir=Path(os.path.normpath(state_dir)))

    # [dht]
    s = _section(ck, doc, "dht")
    d = DHTSection()
    listen = _address(ck, s, ("dht", "listen"), d.listen)
    boots: list[str] = []
    for key, entry in ck.string_list(s, ("dht", "bootstrap"),
                                     "198.51.100.7:8468") or []:
        e = entry.strip()
        if e.startswith(("http://", "https://")) or "://" in e:
            why = check_url(e)
            if why:
                ck.err(("dht", "bootstrap"), f"entry {key[-1] + 1} {why}, got {_show(entry)}", at=key)
                continue
        else:
            try:
                parse_address(e)
            except ValueError as ex:
                ck.err(("dht", "bootstrap"), f'entry {key[-1] + 1} must be "host:port" or an '
                       f"http(s):// URL: {ex}, got {_show(entry)}", at=key)
                continue
        if e in boots:
            ck.err(("dht", "bootstrap"), f"entry {key[-1] + 1} is a duplicate of "
                                         f"{_show(e)}", at=key)
            continue
        boots.append(e)
    mode = ck.choice(s, ("dht", "mode"), d.mode, DHT_MODES)
    ksize = ck.integer(s, ("dht", "ksize"), d.ksize, 1, 64)
    alpha = ck.integer(s, ("dht", "alpha"), d.alpha, 1, 16)
    if alpha > ksize:
        ck.err(("dht", "alpha"), f"must not exceed dht.ksize ({ksize}), got {alpha}")
    record_ttl = ck.integer(s, ("dht", "record_ttl"), d.record_ttl, 10, int(rec.MAX_TTL))
    republish = ck.integer(s, ("dht", "republish_interval"), d.republish_interval, 1)
    if republish >= record_ttl:
        if "republish_interval" in s:
            ck.err(("dht", "republish_interval"), f"must be less than dht.record_ttl "
                                                  f"({record_ttl}), got {republish}")
        else:
            ck.err(("dht", "record_ttl"), f"must be greater than dht.republish_interval "
                                          f"({republish}), got {record_ttl}")
    dht = DHTSection(listen=listen, bootstrap=tuple(boots), mode=mode, ksize=ksize,
                     alpha=alpha, record_ttl=record_ttl, republish_interval=republish)

    # [http]
    s = _section(ck, doc, "http")
    http = HTTPSection(listen=_address(ck, s, ("http", "listen"), HTTPSection().listen))

    # [worker]
    s = _section(ck, doc, "worker")
    w = WorkerSection()
    if "worker" in doc and role != "worker":
        ck.err(("worker",), f'section is only for role = "worker" (agent.role is "{role}")')
    services: list[str] = []
    for key, svc in ck.string_list(s, ("worker", "services"), "ocr") or []:
        if not SERVICE_RE.fullmatch(svc):
            hint = (f", did you mean '{svc.strip().lower()}'?"
                    if SERVICE_RE.fullmatch(svc.strip().lower()) else "")
            ck.err(("worker", "services"), f"entry {key[-1] + 1} must be a service name: 1-63 "
                   'characters of a-z, 0-9, ".", "_", "-", starting with a letter or digit, '
                   f"got {_show(svc)}{hint}", at=key)
        elif svc in services:
            ck.err(("worker", "services"), f"entry {key[-1] + 1} is a duplicate of "
                                           f"{_show(svc)}", at=key)
        else:
            services.append(svc)
    if len(services) > rec.MAX_SERVICES:
        ck.err(("worker", "services"), f"at most {rec.MAX_SERVICES} services fit in one signed "
                                       f"record, got {len(services)}")
    if (role == "worker" and not s.get("services") and isinstance(s.get("services", []), list)
            and isinstance(doc.get("worker", {}), dict)):
        ck.err(("worker", "services"), 'a worker must serve at least one service, '
               'e.g. services = ["ocr"]', ("worker",), ("agent", "role"))
    endpoint = ck.string(s, ("worker", "endpoint"), "", max_len=rec.MAX_ENDPOINT).strip()
    if endpoint:
        why = check_url(endpoint)
        if why:
            ck.err(("worker", "endpoint"), f"{why} (or leave it empty to use the tunnel's URL), "
                                           f"got {_show(endpoint)}")
            endpoint = ""
    max_conc = ck.integer(s, ("worker", "max_concurrency"), w.max_concurrency, 1, 100000)
    gpu: str | None = None
    if "gpu" in s:
        gpu = ck.string(s, ("worker", "gpu"), "", max_len=rec.MAX_GPU, allow_empty=False) or None
    mem: float | None = None
    if "gpu_memory_gb" in s:
        mem = ck.number(s["gpu_memory_gb"], ("worker", "gpu_memory_gb"), 0, None)
    worker = WorkerSection(services=tuple(services), endpoint=endpoint,
                           max_concurrency=max_conc, gpu=gpu, gpu_memory_gb=mem)

    # [tunnel]
    s = _section(ck, doc, "tunnel")
    t = TunnelSection()
    tmode = ck.choice(s, ("tunnel", "mode"), t.mode, TUNNEL_MODES)
    metrics = _address(ck, s, ("tunnel", "metrics"), t.metrics)
    hostname = ck.string(s, ("tunnel", "hostname"), "", max_len=253).strip()
    if hostname:
        why = ("must be a bare host name without scheme or path, e.g. \"worker-1.example.org\""
               if "/" in hostname or ":" in hostname else check_host(hostname))
        if why:
            ck.err(("tunnel", "hostname"), f"{why}, got {_show(hostname)}")
            hostname = ""
        elif tmode != "named":
            ck.err(("tunnel", "hostname"), f'is only used with tunnel.mode = "named" '
                                           f'(mode is "{tmode}")')
    if tmode == "named" and not hostname and "hostname" not in s:
        ck.err(("tunnel", "hostname"), 'is required when tunnel.mode = "named" (the public '
               "host name routed to this tunnel)", ("tunnel", "mode"))
    elif tmode == "named" and not hostname and isinstance(s.get("hostname"), str) \
            and not s["hostname"].strip():
        ck.err(("tunnel", "hostname"), 'is required when tunnel.mode = "named" (the public '
               "host name routed to this tunnel)")
    if endpoint and tmode != "off" and role == "worker":
        ck.err(("worker", "endpoint"), f'is set while tunnel.mode = "{tmode}": which public '
               'URL wins is ambiguous; set endpoint = "" to use the tunnel\'s URL, or '
               'tunnel.mode = "off"')
    if metrics == http.listen:
        ck.err(("tunnel", "metrics"), f"must differ from http.listen ({http.listen})")
    tunnel = TunnelSection(mode=tmode, metrics=metrics, hostname=hostname)

    # [discovery]
    s = _section(ck, doc, "discovery")
    ds = DiscoverySection()
    cache_ttl = ck.integer(s, ("discovery", "cache_ttl"), ds.cache_ttl, 0, 3600)
    coords: list[str] = []
    for key, url in ck.string_list(s, ("discovery", "coordinators"),
                                   "https://coord-1.example.org") or []:
        url = url.strip()
        why = check_url(url)
        if why:
            ck.err(("discovery", "coordinators"), f"entry {key[-1] + 1} {why}, got {_show(url)}", at=key)
        elif url in coords:
            ck.err(("discovery", "coordinators"), f"entry {key[-1] + 1} is a duplicate of "
                                                  f"{_show(url)}", at=key)
        else:
            coords.append(url)
    max_results = ck.integer(s, ("discovery", "max_results"), ds.max_results, 1, 1000)
    scores = dict(DEFAULT_GPU_SCORES)
    if "gpu_scores" in s:
        raw = s["gpu_scores"]
        if not isinstance(raw, dict):
            ck.err(("discovery", "gpu_scores"), 'must be a table of GPU name = score, e.g. '
                   f'gpu_scores = {{ "A100" = 0.8 }}, got {_got(raw)}')
        else:
            for gname, val in raw.items():
                key = ("discovery", "gpu_scores", gname)
                if not gname.strip():
                    ck.err(key, "a GPU name must not be empty")
                    continue
                f = ck.number(val, key, 0, 1)
                if f is not None:
                    scores[gname] = f
    discovery = DiscoverySection(cache_ttl=cache_ttl, coordinators=tuple(coords),
                                 max_results=max_results, gpu_scores=scores)

    # [log]
    s = _section(ck, doc, "log")
    log = LogSection(level=ck.choice(s, ("log", "level"), "info", LOG_LEVELS))

    if ck.errors:
        raise ConfigError(ck.sorted())
    return Config(agent=agent, dht=dht, http=http, worker=worker, tunnel=tunnel,
                  discovery=discovery, log=log,
                  source=Path(spath) if spath != "<config>" else None)


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


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, Address | Path):
        return _toml_str(str(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__}")


def toml_dumps(sections: Mapping[str, Mapping[str, object]]) -> str:
    """``{"section": {"key": value}}`` as TOML (scalars, paths, addresses and lists;
    ``None`` values are left out). Used by ``dump_toml``, ``rma-agent demo`` and the tests."""
    out: list[str] = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{_render_key((str(k),))} = {_toml_value(v)}"
                   for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)


def dump_toml(cfg: Config) -> str:
    """``cfg`` as TOML that ``load_config`` reads back to an equal ``Config``.

    Only GPU scores that differ from ``DEFAULT_GPU_SCORES`` are written (the loader
    merges them over the defaults again). A coordinator's config has no ``[worker]``.
    """
    sections: dict[str, dict[str, object]] = {}
    for sec_name in SCHEMA:
        if sec_name == "worker" and cfg.agent.role != "worker":
            continue
        sec = getattr(cfg, sec_name)
        sections[sec_name] = {key: getattr(sec, key) for key in SCHEMA[sec_name]
                              if key != "gpu_scores"}
    extra = {k: float(v) for k, v in cfg.discovery.gpu_scores.items()
             if DEFAULT_GPU_SCORES.get(k) != v}
    if extra:
        sections["discovery.gpu_scores"] = extra
    return toml_dumps(sections)


def summary(cfg: Config) -> str:
    """One line for ``check-config`` and the startup log."""
    role = cfg.agent.role
    extra = f" services={','.join(cfg.worker.services)}" if role == "worker" else ""
    tunnel = f" tunnel={cfg.tunnel.mode}" if cfg.tunnel.mode != "off" else ""
    return (f"ok: role={role} name={cfg.agent.name} dht={cfg.dht.listen} mode={cfg.dht.mode} "
            f"http={cfg.http.listen} seeds={len(cfg.dht.bootstrap)}{extra}{tunnel}")
