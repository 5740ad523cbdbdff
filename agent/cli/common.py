"""What every ``rma-agent`` command shares: loading the config (errors printed, exit 2),
the local agent's URL, one JSON GET with readable failures, tables, the service-name rule.

Why plain ``urllib``: these commands make one request and exit; an event loop and a
client session would only add start-up time. Exit codes follow the CLI contract: 0 ok,
1 runtime failure (agent unreachable, server error), 2 bad usage (e.g. a bad service name
or parameter, which the agent answers with 400).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from agent.config import SERVICE_RE, Config, ConfigError, default_path, load_config
from agent.dht.record import normalize_service

TIMEOUT_S = 10.0


def load_config_or_report(path: Path, err: TextIO | None = None) -> Config | None:
    """The config at ``path``, or None after printing every error (one
    ``PATH:LINE: key: message`` per line) to ``err``; the caller exits 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=err or sys.stderr)
        return None


def default_url() -> str:
    """The local agent's HTTP address, read from the default config when possible."""
    try:
        cfg = load_config(default_path())
    except (ConfigError, OSError):
        return "http://127.0.0.1:8080"
    host = cfg.http.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.http.listen.port}"


class ClientError(Exception):
    """A failure to show as one line on stderr, with the exit code to return."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def get_json(url: str, timeout: float = TIMEOUT_S) -> Any:
    """GET ``url`` and parse JSON; errors become :class:`ClientError` with one clear line."""
    req = urllib.request.Request(url, headers={"Accept": "application/json",
                                               "User-Agent": "rma-agent-cli"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            msg = exc.reason
        raise ClientError(f"{msg} (HTTP {exc.code})", 2 if 400 <= exc.code < 500 else 1) \
            from None
    except urllib.error.URLError as exc:
        base = _base(url)
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise ClientError(f"cannot reach the agent at {base}: connection refused "
                              "(is rma-agent running? see: systemctl status rma-agent)") from None
        if isinstance(reason, socket.gaierror):
            raise ClientError(f"cannot resolve the agent's host in {base}: {reason}") from None
        if isinstance(reason, TimeoutError | socket.timeout):
            raise ClientError(f"the agent at {base} did not answer within {timeout:g} s") \
                from None
        raise ClientError(f"cannot reach the agent at {base}: {reason}") from None
    except TimeoutError:
        raise ClientError(f"the agent at {_base(url)} did not answer within {timeout:g} s") \
            from None
    except (ValueError, OSError) as exc:  # e.g. a malformed URL, a reset connection
        raise ClientError(f"cannot query {url}: {exc}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ClientError(f"{url} did not answer JSON (is this an rma-agent?)") from None


def _base(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          right: Sequence[int] = ()) -> str:
    """A plain text table: columns as wide as their longest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def num(v: Any, fmt: str = "{:g}") -> str:
    """A number as a table cell (``-`` when absent)."""
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def fail(prog: str, exc: ClientError, err: TextIO) -> int:
    """Print ``exc`` as ``rma-agent PROG: ...``; its exit code."""
    print(f"rma-agent {prog}: {exc}", file=err)
    return exc.code


def cli_service(command: str, service: str, err: TextIO) -> str | None:
    """A service name typed on the command line, lowercased (``OCR`` finds ``ocr``), or
    None after printing the one service-name rule to ``err`` (the caller exits 2)."""
    name = normalize_service(service)
    if SERVICE_RE.fullmatch(name):
        return name
    print(f"rma-agent {command}: bad service name {service!r}: 1-63 characters of "
          "lowercase a-z, 0-9, '.', '_', '-', starting with a letter or digit", file=err)
    return None
