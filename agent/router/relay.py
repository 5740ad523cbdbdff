"""Sending a worker's answer back to the router's caller, and the router's own errors.

The answer streams as it arrives: its head at once, then each chunk as it comes (no
buffering, no decompression; only a small answer already complete with its head is sent
in one write). Whatever ends it early — the worker cut it short, the caller hung up,
the handler was cancelled — the connection to the worker is *closed*, never returned to
the pool half-read, so the worker sees its caller go and stops working for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from agent.ratelimit import RateLimiter
from agent.router.proxy import response_headers

log = logging.getLogger("rma_agent.router")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=5)

SMALL_ANSWER_BYTES = 64 * 1024   # answers up to this size (with a length) are relayed whole


def error(status: int, message: str, *, attempts: int | None = None,
          extra: dict[str, str] | None = None) -> web.Response:
    """The router's own answers: JSON ``{"error": ...}`` (and ``attempts`` when tried)."""
    body: dict[str, Any] = {"error": message}
    if attempts is not None:
        body["attempts"] = attempts
    return web.json_response(body, status=status, headers=extra)


async def relay(request: web.Request, resp: aiohttp.ClientResponse, wid: bytes,
                attempts: int) -> tuple[web.StreamResponse, str]:
    """Stream the worker's answer to the caller; (response, outcome label). A
    cancellation (the caller hung up) closes the worker's connection and propagates."""
    headers = response_headers(resp.headers)
    headers["RMA-Worker"] = wid.hex()
    headers["RMA-Attempts"] = str(attempts)
    outcome = "ok" if resp.status < 500 else "upstream_error"
    length = resp.content_length
    if length is None or length > SMALL_ANSWER_BYTES or request.method == "HEAD" \
            or not resp.content.is_eof():
        return await _stream(request, resp, wid, headers, outcome)
    # a small answer of known length, all here already: one read and one write (the
    # common case; memory is bounded by SMALL_ANSWER_BYTES per request). One still
    # arriving streams: an answer is never held back waiting for more of it.
    try:
        body = await resp.content.readexactly(length)
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        resp.close()
        return error(502, f"worker {wid.hex()[:12]} cut its answer short: "
                          f"{str(exc) or type(exc).__name__}",
                     extra={"RMA-Worker": wid.hex(), "RMA-Attempts": str(attempts)}), \
            "aborted"
    except BaseException:
        resp.close()
        raise
    resp.release()
    return web.Response(status=resp.status, reason=resp.reason, body=body,
                        headers=headers), outcome


async def _stream(request: web.Request, resp: aiohttp.ClientResponse, wid: bytes,
                  headers: CIMultiDict[str], outcome: str) -> tuple[web.StreamResponse, str]:
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if resp.content_length is not None:
        out.content_length = resp.content_length
    try:
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # the worker or the caller went away mid-answer (or the worker fell silent for
        # longer than gateway.upstream_timeout): nothing sensible can be sent any more;
        # closing the connection tells the caller the answer is incomplete
        outcome = "aborted"
        _LOG_LIMIT.log(log, logging.INFO, "abort",
                       "router: answer from worker %s cut short: %s", wid.hex()[:12],
                       str(exc) or type(exc).__name__)
        resp.close()
        if request.transport is not None:
            request.transport.close()
    except BaseException:
        resp.close()
        raise
    finally:
        resp.release()
    return out, outcome
