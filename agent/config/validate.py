"""Validators: the ``_Checker`` that collects every error as ``PATH:LINE: key: message``,
the typed readers it offers, and the host / address / URL checks shared with other
modules (``check_host``, ``parse_address``, ``check_url``).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from agent.config.locator import _BARE_KEY_RE, KeyPath, _Locator
from agent.config.model import SCHEMA, Address

_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


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

    def unique_list(self, sec: dict[str, Any], key: KeyPath, example: str,
                    check: Callable[[str], tuple[str, str | None]]) -> list[str]:
        """The array's valid entries, each once, in order.

        ``check`` maps a raw entry to ``(value, why)``: the normalised value to keep, or
        ``why`` it is wrong (the message after "entry N "). Every array key reports a bad
        entry and a repeated value the same way, on the entry's own line.
        """
        kept: list[str] = []
        for at, raw in self.string_list(sec, key, example) or []:
            value, why = check(raw)
            if why is not None:
                self.err(key, f"entry {at[-1] + 1} {why}", at=at)
            elif value in kept:
                self.err(key, f"entry {at[-1] + 1} is a duplicate of {_show(value)}", at=at)
            else:
                kept.append(value)
        return kept


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
