"""The lean upstream client: request-targets, the request head, and pooled keep-alive
connections against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from agent.config import GatewaySection, Upstream
from agent.gateway.proxy import (
    NOT_PROCESSED,
    forward_headers,
    proxy,
    request_head,
    target_url,
)
from agent.gateway.upstream import Origin, Pool, UpstreamUnreachable, exchange
from tests.util import free_port


def test_origin_target_is_the_string_twin_of_target_url() -> None:
    for base in ("http://127.0.0.1:9000", "http://gpu.local/api", "http://[::1]:81/p/"):
        origin = Origin.parse(base)
        assert origin is not None
        for raw in ("/ocr/v1/run?x=%2F&y=1", "/ocr/a%20b/%2F", "/ocr", "/ocr/", "/ocr?q",
                    "/ocr/x/y?"):
            assert origin.target(raw) == target_url(Upstream(base), raw).raw_path_qs, \
                (base, raw)
    assert Origin.parse("http://gpu.local/api") == Origin("gpu.local", 80, "gpu.local", "/api")
    assert Origin.parse("http://[::1]:81/p/") == Origin("::1", 81, "[::1]:81", "/p/")
    # the lean path leaves TLS and credentials to the session
    assert Origin.parse("https://gpu.local:8443") is None
    assert Origin.parse("http://u:p@gpu.local") is None


class _Transport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("192.0.2.7", 41000) if name == "peername" else default


def _request(method: str, path: str, headers: list[tuple[str, str]]) -> web.Request:
    return make_mocked_request(method, path, transport=_Transport(),
                               headers=CIMultiDict(headers))


def test_request_head_carries_the_forwarded_headers_and_frames_the_body() -> None:
    origin = Origin.parse("http://127.0.0.1:9000/base")
    assert origin is not None
    req = _request("POST", "/ocr/run?a=1", [
        ("Host", "w.example"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
        ("Content-Length", "3"), ("X-Forwarded-For", "10.0.0.1"), ("Accept", "*/*")])
    head = request_head(req, origin, b"abc")
    text = head.decode()
    lines = text.split("\r\n")
    assert lines[0] == "POST /base/run?a=1 HTTP/1.1"
    assert lines[1] == "Host: 127.0.0.1:9000"
    assert text.endswith("\r\nContent-Length: 3\r\n\r\nabc")
    # the same headers (in the same order) as the session path sends
    assert lines[2:-3] == [f"{k}: {v}" for k, v in forward_headers(req).items()]
    assert "X-Hop" not in text and "Connection" not in text and "w.example:" not in text
    assert "X-Forwarded-For: 10.0.0.1, 192.0.2.7" in lines
    # no body: GET sends no length, POST says 0 (what aiohttp's client does)
    assert request_head(_request("GET", "/ocr", []), origin, None).endswith(
        b"X-Forwarded-Proto: http\r\n\r\n")
    assert request_head(_request("POST", "/ocr", []), origin, None).endswith(
        b"Content-Length: 0\r\n\r\n")


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, list[int]]]:
    """A real server; the list collects the client port each request came from."""
    ports: list[int] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        if request.query.get("close"):
            return web.Response(text="bye", headers={"Connection": "close"})
        if request.query.get("sleep"):
            await asyncio.sleep(float(request.query["sleep"]))
        if request.query.get("chunked"):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b"a" * 10, b"b" * 20):
                await resp.write(part)
            await resp.write_eof()
            return resp
        return web.Response(body=await request.read() or b"ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield port, ports
    await runner.cleanup()


async def _get(pool: Pool, target: str, read_timeout: float = 5.0) -> bytes:
    proto = await pool.acquire(1.0)
    message = None
    try:
        message, payload = await exchange(
            proto, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), head_only=False,
            read_timeout=read_timeout)
        data = await payload.read()
    except BaseException:
        proto.close()
        raise
    pool.release(proto, message)
    return data


async def test_pool_reuses_a_connection_until_the_upstream_closes_it(
        upstream: tuple[int, list[int]]) -> None:
    port, ports = upstream
    origin = Origin.parse(f"http://127.0.0.1:{port}")
    assert origin is not None
    pool = Pool(origin)
    assert [await _get(pool, "/x") for _ in range(3)] == [b"ok"] * 3
    assert await _get(pool, "/c?chunked=1") == b"a" * 10 + b"b" * 20   # dechunked
    assert len(set(ports)) == 1                      # one keep-alive connection throughout
    assert await _get(pool, "/x?close=1") == b"bye"  # Connection: close -> not pooled
    assert await _get(pool, "/x") == b"ok"
    assert len(set(ports)) == 2 and ports[-1] != ports[-2]
    pool.close()


async def test_a_silent_upstream_times_out_and_its_connection_is_dropped(
        upstream: tuple[int, list[int]]) -> None:
    port, ports = upstream
    origin = Origin.parse(f"http://127.0.0.1:{port}")
    assert origin is not None
    pool = Pool(origin)
    with pytest.raises(TimeoutError):
        await _get(pool, "/x?sleep=2", read_timeout=0.2)
    assert await _get(pool, "/x") == b"ok"
    assert len(set(ports)) == 2                      # the timed-out one was not reused
    pool.close()


async def test_a_refused_connection_is_unreachable() -> None:
    origin = Origin.parse(f"http://127.0.0.1:{free_port()}")
    assert origin is not None
    with pytest.raises(UpstreamUnreachable):
        await Pool(origin).acquire(1.0)


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_if_idempotent(
) -> None:
    """An upstream that drops a kept-alive connection as the next request arrives (each
    connection answers its first request only): GET is sent again on a new connection,
    POST is answered 502 (it may have been processed; the gateway does not resend it)."""
    conns: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")       # the second request: dropped
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    origin = Origin.parse(f"http://127.0.0.1:{port}")
    assert origin is not None
    pool = Pool(origin)
    gw = GatewaySection()
    try:
        for method, status in (("GET", 200), ("GET", 200), ("POST", 502)):
            resp, _, _, _ = await proxy(_request(method, "/svc/x", []), None,  # type: ignore[arg-type]
                                        Upstream(f"http://127.0.0.1:{port}"), gw, pool)
            assert resp.status == status, (method, resp.status)
            assert NOT_PROCESSED not in resp.headers
        assert len(conns) == 2     # the first GET, then the retried one; POST got no new one
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
