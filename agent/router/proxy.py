"""What the router forwards and when it may try again (header rules, bodies, retries).

**Headers.** Hop-by-hop headers (RFC 9110 §7.6.1: ``Connection`` and every header it
names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
``Upgrade``, ``Proxy-Authenticate``/``-Authorization``) never cross the router in either
direction; neither do ``Host`` (the worker's own), ``Expect`` (the router answers it), the
router's own request headers (``RMA-Region``, ``RMA-GPU``, ``RMA-Min-GPU-Memory-GB``) or
``RMA-Worker``/``RMA-Attempts`` from a worker (only the router says who served).

**Bodies and retries** (the decision, also in README):

* a request without a body, or with one of at most ``RETRY_BUFFER_BYTES`` (1 MiB), is
  read whole before the first attempt and can be sent again to another worker;
* a larger body (or a chunked one that turns out larger) is streamed: the first
  ``RETRY_BUFFER_BYTES`` already read, then the rest as it arrives, never held in
  memory. It can be retried only while none of it was handed to a worker (a refused
  connection, a failed ownership proof); once bytes were sent, the worker's answer —
  even ``503`` + ``RMA-Not-Processed`` — goes back to the caller, who still has the body.

**When to retry.** Surely-not-processed outcomes are retried for every method: the
connection could not be made, the worker's proof failed (nothing was sent), or the
worker answered with ``RMA-Not-Processed: 1``. Idempotent methods (RFC 9110 §9.2.2:
GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are also retried on 502/503/504 and when the
connection failed or timed out before response headers. Everything else is answered as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import aiohttp
import aiohttp.web
from aiohttp import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

RETRY_BUFFER_BYTES = 1 << 20
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
})
FILTER_HEADERS = ("RMA-Region", "RMA-GPU", "RMA-Min-GPU-Memory-GB")
_DROP_REQUEST = HOP_BY_HOP | {"host", "expect", "content-length", "rma-region", "rma-gpu",
                              "rma-min-gpu-memory-gb", "rma-worker", "rma-attempts"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "rma-worker", "rma-attempts"}


def _connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def _filtered(headers: CIMultiDictProxy[str] | CIMultiDict[str],
              drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in named:
            continue
        out.add(k, v)
    return out


def request_headers(headers: CIMultiDictProxy[str], content_length: int | None) -> CIMultiDict[str]:
    """Headers to send to the worker. ``content_length`` is set when the body's length
    is known (buffered, or declared by the caller); otherwise the body goes chunked."""
    out = _filtered(headers, _DROP_REQUEST)
    if content_length is not None:
        out["Content-Length"] = str(content_length)
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send back to the caller (Content-Length is the response object's)."""
    return _filtered(headers, _DROP_RESPONSE)


def dot_segments(raw_path: str) -> bool:
    """Whether a raw (still percent-encoded) path has ``.`` or ``..`` segments: the
    router never lets a caller step out of ``/{service}/`` on the worker's gateway."""
    for seg in raw_path.split("/"):
        s = seg.lower().replace("%2e", ".")
        if s in (".", ".."):
            return True
    return False


class CallerBodyError(ConnectionError):
    """The caller's request body stream failed while it was being forwarded."""


class Body:
    """A request body as the attempts see it: whole bytes (replayable), or a prefix plus
    the rest of the caller's stream (replayable only until a worker started reading)."""

    def __init__(self, data: bytes | None, stream: StreamReader | None = None,
                 length: int | None = None) -> None:
        self.data = data
        self.stream = stream
        self.length = length if stream is not None else (len(data) if data else None)
        self.started = False          # a worker began to receive the streamed part
        self.caller_failed = False    # the caller's own stream broke (not the worker's fault)

    @property
    def replayable(self) -> bool:
        return self.stream is None or not self.started

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What one attempt sends."""
        if self.stream is None:
            return self.data
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        self.started = True
        if self.data:
            yield self.data
        assert self.stream is not None
        try:
            async for chunk in self.stream.iter_any():
                yield chunk
        except (OSError, ValueError, aiohttp.ClientError, aiohttp.web.HTTPException) as exc:
            # e.g. the caller hung up mid-upload, or sent less than its Content-Length
            self.caller_failed = True
            raise CallerBodyError(str(exc) or type(exc).__name__) from None


async def read_body(method: str, content: StreamReader, content_length: int | None,
                    has_body: bool) -> Body:
    """Buffer up to ``RETRY_BUFFER_BYTES`` of the caller's body; stream the rest."""
    if not has_body or content_length == 0:
        return Body(None)
    if content_length is not None and content_length <= RETRY_BUFFER_BYTES:
        return Body(await content.readexactly(content_length))
    if content_length is not None:
        return Body(b"", content, content_length)
    parts: list[bytes] = []
    size = 0
    while size <= RETRY_BUFFER_BYTES:
        chunk = await content.readany()
        if not chunk:
            return Body(b"".join(parts))
        parts.append(chunk)
        size += len(chunk)
    return Body(b"".join(parts), content, None)


def header_names(headers: Iterable[str]) -> set[str]:
    return {h.lower() for h in headers}
