"""What the router forwards and when it may try again (header rules, bodies, retries).

**Headers.** Hop-by-hop headers (the rule is :mod:`agent.http.forwarding`'s, shared with
the gateway; so is the path rule) never cross the router in either direction; neither do ``Host`` (the worker's own), ``Expect`` (the router answers it), the
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
worker answered ``502``/``503`` with ``RMA-Not-Processed: 1`` (its gateway's refusals
before forwarding; on any other status the header is ignored, see
:mod:`agent.router.component`). Idempotent methods (RFC 9110 §9.2.2:
GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are also retried on 502/503/504 and when the
connection failed or timed out before response headers. Everything else is answered as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import aiohttp.web
from aiohttp import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from agent.http.forwarding import end_to_end

RETRY_BUFFER_BYTES = 1 << 20
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
FILTER_HEADERS = ("RMA-Region", "RMA-GPU", "RMA-Min-GPU-Memory-GB")
_DROP_REQUEST = frozenset({"host", "expect", "content-length", "rma-region", "rma-gpu",
                              "rma-min-gpu-memory-gb", "rma-worker", "rma-attempts"})
_DROP_RESPONSE = frozenset({"content-length", "rma-worker", "rma-attempts"})


def request_headers(headers: CIMultiDictProxy[str], content_length: int | None) -> CIMultiDict[str]:
    """Headers to send to the worker. ``content_length`` is set when the body's length
    is known (buffered, or declared by the caller); otherwise the body goes chunked."""
    out = end_to_end(headers, _DROP_REQUEST)
    if content_length is not None:
        out["Content-Length"] = str(content_length)
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send back to the caller (Content-Length is the response object's)."""
    return end_to_end(headers, _DROP_RESPONSE)


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
        # called for every streamed chunk handed to the worker: the attempt's budget runs
        # from the last body byte, so an upload that keeps coming is never cut for length
        self.progress: Callable[[], None] | None = None

    @property
    def replayable(self) -> bool:
        return self.stream is None or not self.started

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What one attempt sends."""
        if self.stream is None:
            return self.data
        return self._gen()

    def _progressed(self) -> None:
        if self.progress is not None:
            self.progress()

    async def _gen(self) -> AsyncIterator[bytes]:
        self.started = True
        if self.data:
            self._progressed()
            yield self.data
        assert self.stream is not None
        try:
            async for chunk in self.stream.iter_any():
                self._progressed()
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

