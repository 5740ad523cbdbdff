"""``rma-agent status``: the local agent's state (``GET /api/dht/stats``) as a table or
raw JSON, with a warning when most peers run a newer version."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from agent.cli.common import ClientError, fail, get_json, num


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
        ("admission cert", admission_cert(stats)),
        ("registry", _pick(stats, "coordinator.registry_size")),
        ("dht lookups p50/p99", _pair_ms(_pick(stats, "lookups.p50_ms"),
                                         _pick(stats, "lookups.p99_ms"))),
        ("service lookups", disc.get("lookups")),
        ("cache hit rate", _pct(disc.get("cache_hit_rate"))),
        ("lookup p50/p99", _pair_ms(disc.get("lookup_p50_ms"), disc.get("lookup_p99_ms"))),
        ("failing workers", disc.get("failing_workers")),
        ("kernels", stats.get("kernels")),
        ("uptime", num(stats.get("uptime_s"), "{:.0f} s")),
        ("version", stats.get("version")),
        ("fleet versions", _fleet_versions(stats.get("versions"))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in rows)


def admission_cert(stats: dict[str, Any]) -> str | None:
    """A closed network's worker certificate: expiry and renewal state, e.g.
    "until 2026-12-10 09:00 UTC (4.2 days); renewal waiting (renews at 2026-12-08 ...)"."""
    import time

    cert = _pick(stats, "network.certificate")
    renewal = _pick(stats, "worker.certificate_renewal")
    not_after = (cert or {}).get("not_after") if isinstance(cert, dict) else None
    if not_after is None and isinstance(renewal, dict):
        not_after = renewal.get("not_after")
    if not isinstance(not_after, int | float):
        return None
    left = not_after - time.time()
    out = (f"until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(not_after))} "
           + (f"({left / 86400:.1f} days)" if left >= 86400 else
              f"({left / 3600:.1f} h)" if left > 0 else "(EXPIRED)"))
    if isinstance(renewal, dict):
        state = str(renewal.get("state", ""))
        out += f"; renewal {state}"
        if renewal.get("failures"):
            out += f", {renewal['failures']} failed: {str(renewal.get('last_error', ''))[:120]}"
        elif isinstance(renewal.get("renew_at"), int | float) and state == "waiting":
            out += f" (renews at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(renewal['renew_at']))})"
    return out


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
    return None if v is None else num(v * 100 if isinstance(v, int | float) else v,
                                       "{:.1f} %")


def _pair_ms(a: Any, b: Any) -> str | None:
    if a is None and b is None:
        return None
    return f"{num(a, '{:.2f}')} / {num(b, '{:.2f}')} ms"


def cmd_status(url: str, as_json: bool, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """``rma-agent status``: the local agent's state, a table or raw JSON."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        stats = get_json(url.rstrip("/") + "/api/dht/stats")
    except ClientError as exc:
        return fail("status", exc, err)
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
