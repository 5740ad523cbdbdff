"""``rma-agent lookup SERVICE [--explain]``: the ranked workers of a service, as a
table, the explained ranking (score parts, who was left out and why) or raw JSON."""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from agent.cli.common import ClientError, cli_service, fail, get_json, num, table


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
            num(w.get("gpu_memory_gb"), "{:g} GB"),
            f"{num(w.get('load'))}/{num(cap)}", w.get("region") or "-",
            num(w.get("latency_ms"), "{:.1f} ms"), num(w.get("age_s"), "{:.0f} s"),
            num(w.get("score"), "{:.3f}"), w.get("endpoint") or "-",
        ))
    head = (f"{service}: {len(workers)} worker{'s' if len(workers) != 1 else ''}, "
            f"best first (source: {source})")
    if source == "stale":         # discovery's last-known-good copy: say how old it is
        head += (f" — neither the DHT nor a coordinator answered; last-known-good copy "
                 f"from {num(answer.get('age_s'), '{:.0f} s')} ago")
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
    """The agent URL of one lookup (``GET /api/services/{name}?limit=&region=&gpu=``)."""
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if region:
        params["region"] = region
    if gpu:
        params["gpu"] = gpu
    q = ("?" + urllib.parse.urlencode(params)) if params else ""
    return f"{url.rstrip('/')}/api/services/{urllib.parse.quote(service, safe='')}{q}"


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
        return fail("lookup", exc, err)
    if as_json:
        print(json.dumps(answer, indent=2), file=out)
        return 0
    if not isinstance(answer, dict):
        print("rma-agent lookup: unexpected answer (not a JSON object)", file=err)
        return 1
    print((formatter or format_lookup)(answer), file=out)
    return 0


def format_explain(answer: dict[str, Any]) -> str:
    """The explained ranking as text: workers with score parts, then the excluded."""
    service = answer.get("service", "?")
    workers = answer.get("workers") or []
    lines = [f"{service}: {len(workers)} worker{'s' if len(workers) != 1 else ''} offered, "
             f"deterministic order (source: {answer.get('source', '?')})"]
    parts = ("load", "gpu", "region", "latency", "age", "health")
    rows = []
    for w in workers:
        c = w.get("components") or {}
        rows.append((w.get("rank"), w.get("name"), str(w.get("id", ""))[:12], w.get("state"),
                     num(w.get("score"), "{:.4f}"),
                     *(num(c.get(p), "{:+.4f}") for p in parts)))
    if rows:
        lines.append(table(("#", "name", "id", "state", "score", *parts), rows,
                           right=(0, 4, 5, 6, 7, 8, 9, 10)))
    if answer.get("formula"):
        lines.append("")
        lines.append(str(answer["formula"]))
    if answer.get("note"):
        lines.append(str(answer["note"]))
    excluded = answer.get("excluded") or []
    lines.append("")
    if excluded:
        total = answer.get("excluded_total", len(excluded))
        shown = f", first {len(excluded)} shown" if total > len(excluded) else ""
        lines.append(f"not offered ({total}{shown}):")
        lines.append(table(("name", "id", "state", "why"),
                           [(x.get("name") or "-", str(x.get("id", ""))[:12], x.get("state"),
                             x.get("reason")) for x in excluded]))
    else:
        lines.append("not offered: none")
    return "\n".join(lines)


def cmd_lookup_explain(url: str, service: str, limit: int | None, as_json: bool,
                       region: str | None = None, gpu: str | None = None,
                       out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``rma-agent lookup SERVICE --explain``: the lookup with each worker's score parts."""
    return cmd_lookup(url, service, limit, as_json, region, gpu, out, err, explain=True,
                      formatter=format_explain)
