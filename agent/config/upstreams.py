"""One ``[gateway.upstreams]`` entry: a URL string, or an inline table.

``ocr = "http://127.0.0.1:9000"`` is a ``generic`` upstream (health: any answer below 500
at its URL). The table form names more: ``health`` (a path on the URL: 2xx/3xx),
``kind`` (the server behind it — ``vllm``, ``llamacpp``, ``tgi``, ``ollama``, ``triton``:
the gateway then reads that server's own health and load, see ``agent.gateway.kinds``)
and, for the kinds whose load is Prometheus text, ``metrics_url`` (Triton serves its
metrics on another port, 8002 by default). Every mistake is reported with file, line
and key, unknown keys and kinds with a "did you mean".
"""

from __future__ import annotations

import difflib
import urllib.parse

from agent.config.locator import KeyPath
from agent.config.model import METRICS_KINDS, UPSTREAM_KEYS, UPSTREAM_KINDS, Upstream
from agent.config.validate import _Checker, _got, _show, check_url

EXAMPLE = '{ url = "http://127.0.0.1:8000", kind = "vllm" }'


def _did_you_mean(word: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f", did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"


def _url(ck: _Checker, key: KeyPath, val: object, what: str) -> str | None:
    """An http(s) URL without a query, or None after recording what is wrong."""
    if not isinstance(val, str):
        ck.err(key, f"must be an http(s) URL string, e.g. \"http://127.0.0.1:9000\"{what}, "
               f"got {_got(val)}")
        return None
    url = val.strip()
    why = check_url(url)
    if why is None and urllib.parse.urlsplit(url).query:
        why = "must not contain a ?query"
    if why:
        ck.err(key, f"{why}, got {_show(val)}")
        return None
    return url.rstrip("/") or url


def _health(ck: _Checker, key: KeyPath, hv: object) -> str | None:
    if not isinstance(hv, str) or (hv and (not hv.startswith("/") or any(
            c.isspace() or ord(c) < 32 or c in "#?" for c in hv))):
        ck.err(key, 'must be a path starting with "/" (no query, no spaces), '
               f"e.g. \"/healthz\", got {_got(hv)}")
        return None
    return hv


def _kind(ck: _Checker, key: KeyPath, kv: object) -> str | None:
    if not isinstance(kv, str):
        ck.err(key, f"must be one of {', '.join(UPSTREAM_KINDS)}, got {_got(kv)}")
        return None
    if kv not in UPSTREAM_KINDS:
        ck.err(key, f"unknown kind {_show(kv)}{_did_you_mean(kv, UPSTREAM_KINDS)}")
        return None
    return kv


def _table(ck: _Checker, key: KeyPath, val: dict[str, object]) -> Upstream | None:
    ok = True
    for k in val:
        if k not in UPSTREAM_KEYS:
            ck.err((*key, k), "unknown key" + _did_you_mean(k, UPSTREAM_KEYS))
            ok = False
    if "url" not in val:
        ck.err(key, f"needs a url, e.g. {EXAMPLE}")
        return None
    url = _url(ck, (*key, "url"), val["url"], "")
    health = _health(ck, (*key, "health"), val.get("health", ""))
    kind = _kind(ck, (*key, "kind"), val.get("kind", "generic"))
    metrics_url = ""
    if "metrics_url" in val:
        if kind is not None and kind not in METRICS_KINDS:
            ck.err((*key, "metrics_url"), f"is only for the kinds whose load is Prometheus "
                   f"text ({', '.join(METRICS_KINDS)}), not {kind!r}")
            ok = False
        else:
            metrics_url = _url(ck, (*key, "metrics_url"), val["metrics_url"],
                               ' (e.g. Triton\'s "http://127.0.0.1:8002/metrics")') or ""
            ok = ok and bool(metrics_url)
    if url is None or health is None or kind is None or not ok:
        return None
    return Upstream(url=url, health=health, kind=kind, metrics_url=metrics_url)


def upstream_entry(ck: _Checker, key: KeyPath, svc: str, val: object,
                   services: tuple[str, ...]) -> Upstream | None:
    """One ``[gateway.upstreams]`` entry, or None after recording what is wrong."""
    if svc not in services:
        listed = ", ".join(services) or "none"
        close = difflib.get_close_matches(svc, list(services), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else ""
        ck.err(key, f"is not a service of this worker (worker.services: {listed}){hint}")
        return None
    if isinstance(val, dict):
        return _table(ck, key, val)
    url = _url(ck, key, val, f", or a table {EXAMPLE}")
    return Upstream(url=url) if url is not None else None
