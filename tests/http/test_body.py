"""``agent.http.body.read_bounded``: the one bounded body read of the coordinator's
registration and the enrollment endpoint, over real sockets (a body split over TCP
segments, a declared length over the limit, a chunked body with no length at all).
The endpoints' own answers are tested in tests/roles/test_coordinator_*.py and
tests/admission/test_enroll_endpoint.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.http.body import BodyTooLarge, read_bounded

LIMIT = 100


class Reader:
    """A server whose one handler reads the body with ``read_bounded(LIMIT)``: 200 and
    the length read, or 413; ``started`` is set when the handler begins to read."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/", self.handle)
        self.server = TestServer(self.app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            raw = await read_bounded(request, LIMIT)
        except BodyTooLarge as exc:
            return web.json_response({"error": str(exc)}, status=413)
        return web.json_response({"read": len(raw)})

    async def exchange(self, head: bytes, *parts: bytes) -> bytes:
        """Send ``head`` and then each part once the handler has started; the raw answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(head)
            await writer.drain()
            for part in parts:
                await asyncio.wait_for(self.started.wait(), 10)
                writer.write(part)
                await writer.drain()
            return await asyncio.wait_for(answer(reader), 10)
        finally:
            writer.close()


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One HTTP answer, head and body (by its Content-Length): the server may keep the
    connection open to drain a body it refused, so EOF is not awaited."""
    top = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in top.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return top + await reader.readexactly(length)


@pytest.fixture
async def srv() -> AsyncIterator[Reader]:
    r = Reader()
    await r.server.start_server()
    try:
        yield r
    finally:
        await r.server.close()


def head(length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing + b"\r\n\r\n"


async def test_a_body_split_over_segments_is_read_to_its_end(srv: Reader) -> None:
    # the second segment leaves only once the handler is reading: a single
    # content.read(n) would see the first 40 bytes alone
    raw = await srv.exchange(head(LIMIT) + b"x" * 40, b"y" * (LIMIT - 40))
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert raw.endswith(b'{"read": %d}' % LIMIT), raw[-200:]


async def test_a_declared_length_over_the_limit_is_refused_before_reading(srv: Reader) -> None:
    # no body is ever sent: an answer at all shows nothing was waited for
    raw = await srv.exchange(head(LIMIT + 1))
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    assert b"body too large (max %d bytes)" % LIMIT in raw


async def test_a_chunked_body_over_the_limit_is_refused_as_read(srv: Reader) -> None:
    chunk = b"x" * 60
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    raw = await srv.exchange(head(None), chunks)
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    ok = await srv.exchange(head(None), b"%x\r\n%s\r\n0\r\n\r\n" % (60, chunk))
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b'{"read": 60}'), ok[-200:]
