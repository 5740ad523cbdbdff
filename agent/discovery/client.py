"""``rma-agent status`` and ``rma-agent lookup``: a small HTTP client and readable tables.

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
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from agent.config import SERVICE_RE
from agent.dht.record import normalize_service

TIMEOUT_S = 10.0


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


def _num(v: Any, fmt: str = "{:g}") -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _fail(prog: str, exc: ClientError, err: TextIO) -> int:
    print(f"rma-agent {prog}: {exc}", file=err)
    return exc.code


# ---------------------------------------------------------------------- status
def _pick(d: Any, *paths: str) -> Any:
    """The first present value among dotted ``paths`` of a nested dict."""
    for path in paths:
        cur = d
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return None


def format_status(stats: dict[str, Any]) -> str:
    """The readable form of ``GET /api/dht/stats`` (missing fields show as ``-``)."""
    services = _pick(stats, "worker.services", "services")
    if isinstance(services, list | tuple):
        services = ", ".join(map(str, services)) or "-"
    tunnel = _pick(stats, "tunnel")
    if isinstance(tunnel, dict):
        t_mode = tunnel.get("mode") or "-"
        t_url = tunnel.get("endpoint") or tunnel.get("url") or tunnel.get("hostname") or ""
        t_state = tunnel.get("state") or ("ready" if tunnel.get("ready") else "")
        tunnel = " ".join(x for x in (str(t_mode), str(t_url), f"({t_state})" if t_state else "")
                          if x)
    ready = stats.get("ready")
    reasons = stats.get("not_ready_reasons") or []
    found = stats.get("discovery")
    disc: dict[str, Any] = found if isinstance(found, dict) else {}
    rows: list[tuple[str, Any]] = [
        ("name", stats.get("name")),
        ("role", stats.get("role")),
        ("region", stats.get("region") or "-"),
        ("ready", ("yes" if ready else "no: " + "; ".join(map(str, reasons)))
         if ready is not None else None),
        ("node id", stats.get("node_id")),
        ("dht mode", stats.get("mode")),
        ("peers", stats.get("peers")),
        ("routing table", stats.get("routing_table_size")),
        ("records stored", _pick(stats, "records_stored", "records")),
        ("services", services),
        ("endpoint", _pick(stats, "worker.endpoint", "endpoint")),
        ("tunnel", tunnel),
        ("registry", _pick(stats, "coordinator.registry_size")),
        ("dht lookups p50/p99", _pair_ms(_pick(stats, "lookups.p50_ms"),
                                         _pick(stats, "lookups.p99_ms"))),
        ("service lookups", disc.get("lookups")),
        ("cache hit rate", _pct(disc.get("cache_hit_rate"))),
        ("lookup p50/p99", _pair_ms(disc.get("lookup_p50_ms"), disc.get("lookup_p99_ms"))),
        ("failing workers", disc.get("failing_workers")),
        ("kernels", stats.get("kernels")),
        ("uptime", _num(stats.get("uptime_s"), "{:.0f} s")),
        ("version", stats.get("version")),
        ("fleet versions", _fleet_versions(stats.get("versions"))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in rows)


def _fleet_versions(block: Any) -> str | None:
    """``{"peers": {"0.2.0": 3, "": 1}, "sampled": 4}`` -> "0.2.0 x3, v1 record x1 (4 peers)"."""
    if not isinstance(block, dict) or not isinstance(block.get("peers"), dict):
        return None
    peers = block["peers"]
    if not peers:
        return "no peer records seen yet"
    parts = [f"{v or 'v1 record'} x{n}" for v, n in peers.items()]
    return f"{', '.join(parts)} ({block.get('sampled', sum(peers.values()))} peers)"


def outdated_warning(stats: dict[str, Any]) -> str | None:
    """The warning ``rma-agent status`` prints when most peers run a newer version.

    The agent decides (``versions.outdated`` in ``/api/dht/stats``, from the worker
    records its DHT node stores: agent.versions); this only words it."""
    block = stats.get("versions")
    if not isinstance(block, dict) or not block.get("outdated"):
        return None
    from agent.versions import version_key

    local = str(block.get("local", ""))
    newer = ", ".join(f"{v} x{n}" for v, n in (block.get("peers") or {}).items()
                      if version_key(str(v)) > version_key(local))
    return (f"warning: this agent runs {local}, older than {block.get('newer')} of the "
            f"{block.get('sampled')} peers it sees ({newer}); upgrade it: "
            f"apt update && apt upgrade rma-agent")


def _pct(v: Any) -> str | None:
    return None if v is None else _num(v * 100 if isinstance(v, int | float) else v,
                                       "{:.1f} %")


def _pair_ms(a: Any, b: Any) -> str | None:
    if a is None and b is None:
        return None
    return f"{_num(a, '{:.2f}')} / {_num(b, '{:.2f}')} ms"


def cmd_status(url: str, as_json: bool, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """``rma-agent status``: the local agent's state, a table or raw JSON."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        stats = get_json(url.rstrip("/") + "/api/dht/stats")
    except ClientError as exc:
        return _fail("status", exc, err)
    if as_json:
        print(json.dumps(stats, indent=2, sort_keys=True), file=out)
        return 0
    if not isinstance(stats, dict):
        print("rma-agent status: unexpected answer (not a JSON object)", file=err)
        return 1
    print(format_status(stats), file=out)
    warning = outdated_warning(stats)
    if warning:
        print(warning, file=err)
    return 0


# ---------------------------------------------------------------------- lookup
def format_lookup(answer: dict[str, Any]) -> str:
    """The ranked table of ``GET /api/services/{name}``."""
    workers = answer.get("workers") or []
    service = answer.get("service", "?")
    source = answer.get("source", "?")
    if not workers:
        return f"no workers serve {service!r} right now (source: {source})"
    rows = []
    for n, w in enumerate(workers, 1):
        cap = w.get("capacity")
        rows.append((
            n, w.get("name"), str(w.get("id", ""))[:12], w.get("gpu"),
            _num(w.get("gpu_memory_gb"), "{:g} GB"),
            f"{_num(w.get('load'))}/{_num(cap)}", w.get("region") or "-",
            _num(w.get("latency_ms"), "{:.1f} ms"), _num(w.get("age_s"), "{:.0f} s"),
            _num(w.get("score"), "{:.3f}"), w.get("endpoint") or "-",
        ))
    head = (f"{service}: {len(workers)} worker{'s' if len(workers) != 1 else ''}, "
            f"best first (source: {source})")
    if source == "stale":         # discovery's last-known-good copy: say how old it is
        head += (f" — neither the DHT nor a coordinator answered; last-known-good copy "
                 f"from {_num(answer.get('age_s'), '{:.0f} s')} ago")
    text = head + "\n" + table(
        ("#", "name", "id", "gpu", "memory", "load", "region", "latency", "age", "score",
         "endpoint"), rows, right=(0, 4, 5, 7, 8, 9))
    scores = [w.get("score") for w in workers]
    if len(scores) > 1 and all(isinstance(x, int | float) for x in scores) \
            and scores[0] < max(scores[1:]):
        text += ("\n(#1 is drawn at random among the best three on every lookup, "
                 "so callers spread their load)")
    return text


def lookup_url(url: str, service: str, limit: int | None = None, region: str | None = None,
               gpu: str | None = None) -> str:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if region:
        params["region"] = region
    if gpu:
        params["gpu"] = gpu
    q = ("?" + urllib.parse.urlencode(params)) if params else ""
    return f"{url.rstrip('/')}/api/services/{urllib.parse.quote(service, safe='')}{q}"


def cli_service(command: str, service: str, err: TextIO) -> str | None:
    """A service name typed on the command line, lowercased (``OCR`` finds ``ocr``), or
    None after printing the one service-name rule to ``err`` (the caller exits 2)."""
    name = normalize_service(service)
    if SERVICE_RE.fullmatch(name):
        return name
    print(f"rma-agent {command}: bad service name {service!r}: 1-63 characters of "
          "lowercase a-z, 0-9, '.', '_', '-', starting with a letter or digit", file=err)
    return None


def cmd_lookup(url: str, service: str, limit: int | None, as_json: bool,
               region: str | None = None, gpu: str | None = None,
               out: TextIO | None = None, err: TextIO | None = None, *,
               explain: bool = False,
               formatter: Callable[[dict[str, Any]], str] | None = None) -> int:
    """``rma-agent lookup SERVICE [--explain]``: ranked workers as a table or raw JSON.
    ``explain`` asks for the score parts; ``formatter`` renders the answer (default: the
    ranking table)."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = cli_service("lookup", service, err)
    if name is None:
        return 2
    service = name
    target = lookup_url(url, service, limit, region, gpu)
    if explain:
        target += ("&" if "?" in target else "?") + "explain=1"
    try:
        answer = get_json(target)
    except ClientError as exc:
        return _fail("lookup", exc, err)
    if as_json:
        print(json.dumps(answer, indent=2), file=out)
        return 0
    if not isinstance(answer, dict):
        print("rma-agent lookup: unexpected answer (not a JSON object)", file=err)
        return 1
    print((formatter or format_lookup)(answer), file=out)
    return 0
