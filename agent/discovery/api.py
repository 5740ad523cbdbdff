"""HTTP API of discovery (SPEC §5): ``/api/services``, ``/api/services/{name}``, reports.

Every bad input is a 400 with ``{"error": "<what is wrong>"}`` (never a 500):

* service names follow the config rule: lowercase ``[a-z0-9][a-z0-9._-]{0,62}``;
* ``GET /api/services/{name}`` takes only ``limit`` (integer >= 1; values above
  ``discovery.max_results`` are capped to it), ``region`` and ``gpu`` (filters, 1-64
  printable characters), ``min_gpu_memory_gb`` (finite number >= 0) and ``prefer_region``
  (rank this region first instead of the agent's own ``agent.region``); unknown or
  repeated parameters are errors, so a typo is not silently ignored; ``explain=1`` adds
  each worker's score components and why others were excluded (``explain.py``);
* a request header ``Cache-Control: no-cache`` makes the lookup skip the cache;
* ``POST /api/services/{name}/report`` takes a JSON object
  ``{"worker_id": "<40 hex>", "ok": true|false, "latency_ms": <number >= 0, optional>}``
  (at most 4 KiB, no other keys).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiDict

from agent.config import SERVICE_RE
from agent.dht.record import normalize_service
from agent.discovery.select import Query
from agent.http.local_caller import refuse_remote

if TYPE_CHECKING:
    from agent.interfaces import DiscoveryService

LOOKUP_PARAMS = ("limit", "region", "gpu", "min_gpu_memory_gb", "prefer_region")
MAX_TEXT = 64
MAX_REPORT_BYTES = 4096
MAX_LATENCY_MS = 3_600_000.0
COMPONENT_KEY: web.AppKey[Any] = web.AppKey("discovery")


class BadRequest(ValueError):
    """A client error; the message is shown as ``{"error": ...}``."""


def _bad(msg: str) -> web.Response:
    return web.json_response({"error": msg}, status=400)


def check_service(name: str) -> str:
    """The service of an API path, lowercased (``/api/services/OCR`` finds ``ocr``)."""
    name = normalize_service(name)
    if not SERVICE_RE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise BadRequest(f"bad service name {shown!r}: 1-63 characters of lowercase a-z, 0-9, "
                         "'.', '_', '-', starting with a letter or digit")
    return name


def wants_fresh(request: web.Request) -> bool:
    """``Cache-Control: no-cache``: the caller asks for a lookup past the cache."""
    return "no-cache" in request.headers.get("Cache-Control", "").lower()


def _text(name: str, value: str) -> str:
    if not value or len(value) > MAX_TEXT or not value.isprintable():
        raise BadRequest(f"{name} must be 1-{MAX_TEXT} printable characters")
    return value


def parse_query(params: Any, max_results: int) -> Query:
    """Validate the lookup query string into a :class:`Query`."""
    for key in params:
        if key not in LOOKUP_PARAMS:
            raise BadRequest(f"unknown parameter {key!r} (allowed: {', '.join(LOOKUP_PARAMS)})")
        if len(params.getall(key)) > 1:
            raise BadRequest(f"parameter {key!r} given more than once")
    limit = max_results
    if "limit" in params:
        raw = params["limit"]
        try:
            limit = int(raw)
        except ValueError:
            raise BadRequest(f"limit must be an integer, got {raw[:20]!r}") from None
        if limit < 1:
            raise BadRequest("limit must be at least 1")
        limit = min(limit, max_results)
    region = _text("region", params["region"]) if "region" in params else None
    gpu = _text("gpu", params["gpu"]) if "gpu" in params else None
    prefer = _text("prefer_region", params["prefer_region"]) if "prefer_region" in params else ""
    min_mem = None
    if "min_gpu_memory_gb" in params:
        raw = params["min_gpu_memory_gb"]
        try:
            min_mem = float(raw)
        except ValueError:
            raise BadRequest(f"min_gpu_memory_gb must be a number, got {raw[:20]!r}") from None
        if not math.isfinite(min_mem) or min_mem < 0:
            raise BadRequest("min_gpu_memory_gb must be a finite number >= 0")
    return Query(limit=limit, region=region, gpu=gpu, min_gpu_memory_gb=min_mem,
                 caller_region=prefer)


def parse_explain(params: Any) -> bool:
    """``explain=1|true|0|false`` (once): whether to add score components."""
    values = params.getall("explain")
    if len(values) > 1:
        raise BadRequest("parameter 'explain' given more than once")
    value = values[0].lower()
    if value not in ("1", "true", "0", "false", "yes", "no"):
        raise BadRequest(f"explain must be 1 or 0, got {values[0][:20]!r}")
    return value in ("1", "true", "yes")


def parse_report(body: bytes) -> tuple[bytes, bool, float | None]:
    """Validate a report body into (worker_id, ok, latency_ms)."""
    if len(body) > MAX_REPORT_BYTES:
        raise BadRequest(f"report body larger than {MAX_REPORT_BYTES} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest('body must be JSON: {"worker_id": "<hex>", "ok": true, '
                         '"latency_ms": 12.5}') from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    extra = sorted(set(data) - {"worker_id", "ok", "latency_ms"})
    if extra:
        raise BadRequest(f"unknown key(s) {', '.join(map(repr, extra))} "
                         "(allowed: worker_id, ok, latency_ms)")
    wid = data.get("worker_id")
    if not isinstance(wid, str) or len(wid) != 40:
        raise BadRequest("worker_id must be the worker's id: 40 hex characters")
    try:
        worker_id = bytes.fromhex(wid)
    except ValueError:
        raise BadRequest("worker_id must be 40 hex characters") from None
    ok = data.get("ok")
    if not isinstance(ok, bool):
        raise BadRequest("ok must be true or false")
    lat = data.get("latency_ms")
    if lat is not None:
        if isinstance(lat, bool) or not isinstance(lat, int | float):
            raise BadRequest("latency_ms must be a number")
        lat = float(lat)
        if not math.isfinite(lat) or not 0.0 <= lat <= MAX_LATENCY_MS:
            raise BadRequest(f"latency_ms must be between 0 and {MAX_LATENCY_MS:.0f}")
    return worker_id, ok, lat


async def list_services(request: web.Request) -> web.Response:
    comp: DiscoveryService = request.app[COMPONENT_KEY]
    if request.query:
        return _bad("this path takes no parameters")
    return web.json_response(await comp.services())


async def get_service(request: web.Request) -> web.Response:
    comp: DiscoveryService = request.app[COMPONENT_KEY]
    params = request.query
    explain = False
    try:
        service = check_service(request.match_info["name"])
        if "explain" in params:         # "why this worker" (agent/discovery/explain.py)
            explain = parse_explain(params)
            params = MultiDict((k, v) for k, v in params.items() if k != "explain")
        query = parse_query(params, comp.max_results)
    except BadRequest as exc:
        return _bad(str(exc))
    fresh = wants_fresh(request)
    if not comp.allow_lookup(service, fresh):
        return comp.crawl_limit.too_many()
    if explain and not comp.crawl_limit.take():     # explain always crawls the DHT afresh
        return comp.crawl_limit.too_many()
    if explain:
        from agent.discovery.explain import explain as explain_lookup
        return web.json_response(await explain_lookup(comp, service, query, fresh=fresh))
    result = await comp.lookup(service, query, fresh=fresh)
    return web.Response(body=result.body(), content_type="application/json")


async def post_report(request: web.Request) -> web.Response:
    comp: DiscoveryService = request.app[COMPONENT_KEY]
    refused = refuse_remote(request, "a worker report")
    if refused is not None:
        return refused
    try:
        service = check_service(request.match_info["name"])
        if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
            raise BadRequest(f"report body larger than {MAX_REPORT_BYTES} bytes")
        # the app's client_max_size bounds what is read; parse_report checks the 4 KiB
        body = await request.read()
        worker_id, ok, lat = parse_report(body)
    except BadRequest as exc:
        return _bad(str(exc))
    return web.json_response(comp.report(service, worker_id, ok, lat))


def add_routes(app: web.Application, comp: DiscoveryService) -> None:
    app[COMPONENT_KEY] = comp
    app.router.add_get("/api/services", list_services)
    app.router.add_get("/api/services/{name}", get_service)
    app.router.add_post("/api/services/{name}/report", post_report)
