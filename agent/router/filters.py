"""The router's worker filters: ``RMA-Region``, ``RMA-GPU`` and ``RMA-Min-GPU-Memory-GB``
request headers -> a discovery :class:`~agent.discovery.select.Query`, parsed by the same
rules as ``/api/services/{name}?region=&gpu=&min_gpu_memory_gb=`` (errors name the
header, not the query parameter)."""

from __future__ import annotations

from multidict import CIMultiDictProxy, MultiDict

from agent.discovery.api import BadRequest, parse_query
from agent.discovery.select import Query
from agent.router.proxy import FILTER_HEADERS

_PARAMS = {"RMA-Region": "region", "RMA-GPU": "gpu",
           "RMA-Min-GPU-Memory-GB": "min_gpu_memory_gb"}


def filter_query(headers: CIMultiDictProxy[str], max_results: int, limit: int) -> Query:
    """The query for a routed request: at most ``limit`` candidates (a few more than
    tries: some may fail their proof or be skipped). Raises :class:`BadRequest`."""
    limit = min(max_results, limit)
    if not any(h in headers for h in FILTER_HEADERS):
        return Query(limit=limit)
    params: MultiDict[str] = MultiDict()
    for header in FILTER_HEADERS:
        for value in headers.getall(header, ()):
            params.add(_PARAMS[header], value)
    try:
        q = parse_query(params, max_results)
    except BadRequest as exc:
        msg = str(exc)
        for header, param in sorted(_PARAMS.items(), key=lambda hp: -len(hp[1])):
            msg = msg.replace(f"parameter {param!r}", f"header {header}")
            msg = msg.replace(param, header)
        raise BadRequest(msg) from None
    return Query(limit=limit, region=q.region, gpu=q.gpu,
                 min_gpu_memory_gb=q.min_gpu_memory_gb)
