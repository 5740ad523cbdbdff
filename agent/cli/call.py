"""``rma-agent call SERVICE PATH``: one request through the local agent's router.

The answer's body goes to stdout as it arrives (binary-safe, streamed: a large download
or an event stream is not held in memory); one line on stderr says who served it::

    ocr: HTTP 200 from worker 3f9c2a1b7d40... (1 attempt)

``--data @FILE`` streams the file as the body (with its length), ``--data TEXT`` sends the
text; with ``--data`` the method defaults to POST, else GET (``-X`` overrides).
``--header K:V`` may repeat (``RMA-Region``, ``RMA-GPU``, ``RMA-Min-GPU-Memory-GB`` pick
workers).

Exit codes (SPEC §3): 0 when the worker answered 2xx/3xx; 2 for bad usage — a bad
argument, the router's own 400, or a 4xx from the worker's service (the request was
wrong); 1 for runtime failures — the agent unreachable, no worker serves the service, a
429, any 5xx.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import IO, BinaryIO

from agent.cli.common import cli_service

TIMEOUT_S = 330.0          # above the gateway's default upstream_timeout (300 s)
CHUNK = 1 << 16


class UsageError(Exception):
    """Bad arguments: exit 2."""


def parse_headers(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name or any(c in name for c in " \t\r\n") \
                or "\n" in value or "\r" in value:
            raise UsageError(f"--header must be NAME:VALUE, got {item!r}")
        out.append((name, value.strip()))
    return out


def open_data(data: str | None) -> tuple[BinaryIO | bytes | None, int | None]:
    """(body, length) for ``--data``: ``@FILE`` opens the file, anything else is text."""
    if data is None:
        return None, None
    if data.startswith("@"):
        path = data[1:]
        try:
            f = open(path, "rb")
            return f, os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise UsageError(f"--data {data}: {exc.strerror or exc}") from None
    raw = data.encode()
    return raw, len(raw)


def target(url: str, service: str, path: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of ``{url}/route/{service}/{path}``."""
    p = urllib.parse.urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise UsageError(f"--url must be http(s)://HOST:PORT, got {url!r}")
    path = path if path.startswith("/") else "/" + path
    base = p.path.rstrip("/")
    return (p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80),
            f"{base}/route/{service}{path}")


def cmd_call(url: str, service: str, path: str, *, data: str | None = None,
             headers: Sequence[str] = (), method: str | None = None,
             out: IO[bytes] | None = None, err: IO[str] | None = None) -> int:
    out = out if out is not None else sys.stdout.buffer
    err = err if err is not None else sys.stderr
    name = cli_service("call", service, err)
    if name is None:
        return 2
    service = name
    body: BinaryIO | bytes | None = None
    try:
        hdrs = parse_headers(headers)
        scheme, host, port, tgt = target(url, service, path)
        body, length = open_data(data)
    except UsageError as exc:
        print(f"rma-agent call: {exc}", file=err)
        return 2
    verb = (method or ("POST" if data is not None else "GET")).upper()
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=TIMEOUT_S)
    try:
        conn.putrequest(verb, tgt, skip_accept_encoding=True)
        for k, v in hdrs:
            conn.putheader(k, v)
        if length is not None:
            conn.putheader("Content-Length", str(length))
        conn.putheader("User-Agent", "rma-agent-call")
        conn.endheaders()
        if isinstance(body, bytes):
            conn.send(body)
        elif body is not None:
            while chunk := body.read(CHUNK):
                conn.send(chunk)
        resp = conn.getresponse()
        worker = resp.getheader("RMA-Worker")
        attempts = resp.getheader("RMA-Attempts") or "?"
        while chunk := resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK):
            out.write(chunk)
            out.flush()
    except ConnectionRefusedError:
        print(f"rma-agent call: cannot reach the agent at {scheme}://{host}:{port}: "
              "connection refused (is rma-agent running? see: systemctl status rma-agent)",
              file=err)
        return 1
    except TimeoutError:
        print(f"rma-agent call: no answer within {TIMEOUT_S:g} s", file=err)
        return 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"rma-agent call: {exc or type(exc).__name__}", file=err)
        return 1
    finally:
        conn.close()
        if body is not None and not isinstance(body, bytes):
            body.close()
    status = resp.status
    plural = "" if attempts == "1" else "s"
    if worker:
        print(f"{service}: HTTP {status} from worker {worker} ({attempts} attempt{plural})",
              file=err)
    else:
        print(f"{service}: HTTP {status} from the router itself (no worker served it)",
              file=err)
    if status < 400:
        return 0
    if worker:
        return 2 if status < 500 else 1
    return 2 if status < 500 and status not in (404, 429) else 1
