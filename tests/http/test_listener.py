"""The bounded listener (agent.http.listener) on real sockets, in process, with short
limits: slow and idle connections are closed, caps hold per address and in total with
room made by closing idle ones, heads are bounded in size and memory, and what is shed is
counted. Each test asserts what happened to a connection (served, shed, closed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.config import Address
from agent.http.budget import ListenerLimits, listener_limits
from agent.http.connections import ConnectionTable, ListenerMetrics
from agent.http.listener import serve
from agent.netgroups import address_unit
from tests.util import wait_for_async

FAST = ListenerLimits(head_timeout=1.0, keepalive_timeout=1.0, body_idle_timeout=1.0,
                      send_timeout=1.0, max_connections=64, max_per_address=8)


@dataclass
class Served:
    port: int
    table: ConnectionTable
    registry: CollectorRegistry
    release: asyncio.Event
    started: list[str]
    cancelled: list[str]

    def shed(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "rma_agent_http_shed_total", {"listener": "test", "reason": reason})
        return value or 0.0


@contextlib.asynccontextmanager
async def listening(limits: ListenerLimits = FAST) -> AsyncIterator[Served]:
    release = asyncio.Event()
    started: list[str] = []
    cancelled: list[str] = []

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def hold(request: web.Request) -> web.Response:
        started.append(request.path)
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(request.path)
            raise
        return web.json_response({"held": True})

    async def body(request: web.Request) -> web.Response:
        return web.json_response({"length": len(await request.read())})

    async def reject(_request: web.Request) -> web.Response:
        return web.json_response({"error": "too large"}, status=413)    # body left unread

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/ok", ok)
    app.router.add_get("/hold", hold)
    app.router.add_post("/body", body)
    app.router.add_post("/reject", reject)
    registry = CollectorRegistry()
    runner, url, table = await serve(app, Address("127.0.0.1", 0), name="test",
                                     limits=limits, metrics=ListenerMetrics(registry))
    port = int(url.rsplit(":", 1)[1])
    try:
        yield Served(port, table, registry, release, started, cancelled)
    finally:
        release.set()
        await runner.cleanup()


async def _connect(port: int, source: str = "127.0.0.1",
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _get(port: int, path: str = "/ok", source: str = "127.0.0.1") -> bytes:
    reader, writer = await _connect(port, source)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def until(predicate: Callable[[], object], what: str) -> None:
    """Wait for an event the test cannot await directly (bounded: fails, never hangs)."""
    await wait_for_async(predicate, what=what)


async def _closed(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the server sent until it closed (fails if it never closes)."""
    out = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionResetError:
        pass
    return out


async def test_a_connection_that_never_sends_is_closed_with_408() -> None:
    async with listening() as s:
        reader, writer = await _connect(s.port)
        answer = await _closed(reader)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert s.shed("head_timeout") == 1
        writer.close()


async def test_a_head_sent_one_line_at_a_time_is_closed_at_the_head_timeout() -> None:
    async with listening() as s:
        reader, writer = await _connect(s.port)
        writer.write(b"GET /ok HTTP/1.1\r\n")
        lines, answer = 0, b""
        with contextlib.suppress(ConnectionError):
            while lines < 100:                # slow-loris: one header line per 0.3 s
                writer.write(b"X-Slow-%d: 1\r\n" % lines)
                await writer.drain()
                lines += 1
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.3)
                except TimeoutError:
                    continue
                answer += data
                if not data:
                    break
        assert answer.startswith(b"HTTP/1.1 408"), (lines, answer)
        assert s.shed("head_timeout") == 1
        assert (await _get(s.port)).startswith(b"HTTP/1.1 200")   # still serving
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    async with listening() as s:
        reader, writer = await _connect(s.port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        assert await _closed(reader) == b""          # closed quietly: keep-alive is over
        idle = s.registry.get_sample_value("rma_agent_http_idle_closed_total",
                                           {"listener": "test"})
        assert idle == 1 and s.shed("head_timeout") == 0
        writer.close()


async def test_a_stalled_body_is_closed_but_a_complete_one_is_served() -> None:
    async with listening() as s:
        reader, writer = await _connect(s.port)
        writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        await _closed(reader)
        assert s.shed("body_timeout") == 1
        writer.close()
        reader, writer = await _connect(s.port)
        writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Connection: close\r\n\r\nabc")
        assert b'"length": 3' in await _closed(reader)
        writer.close()


async def test_a_body_left_unread_is_not_taken_for_the_next_head() -> None:
    """aiohttp drops the body a handler did not read; those bytes, and a pipelined next
    request's body, are body — not a head past its size cap."""
    async with listening() as s:
        reader, writer = await _connect(s.port)
        big = b"x" * 300_000
        writer.write(b"POST /reject HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(big) + big[:10])
        head = await reader.readuntil(b"\r\n\r\n")      # the handler has returned
        assert head.startswith(b"HTTP/1.1 413"), head
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r")[0]))
        writer.write(big[10:] + b"POST /body HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(big) + big)
        answer = await _closed(reader)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert b'"length": 300000' in answer, answer[-200:]
        assert s.shed("head_too_large") == 0
        writer.close()


async def test_one_address_at_its_cap_leaves_room_for_another_address() -> None:
    async with listening() as s:
        held = []
        for _ in range(FAST.max_per_address):          # busy: handlers wait on `release`
            reader, writer = await _connect(s.port)
            writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append((reader, writer))
        await until(lambda: len(s.started) == FAST.max_per_address, "every handler running")
        refused = await _get(s.port, "/ok", "127.0.0.1")
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After" in refused
        assert s.shed("address_cap") == 1
        served = await _get(s.port, "/ok", "127.0.0.2")
        assert served.startswith(b"HTTP/1.1 200"), served
        s.release.set()
        for _reader, writer in held:
            writer.close()


async def test_idle_connections_of_a_full_address_make_room_for_its_newcomer() -> None:
    async with listening() as s:
        idle = [await _connect(s.port) for _ in range(FAST.max_per_address)]
        await until(lambda: len(s.table.conns) == FAST.max_per_address, "the address at its cap")
        served = await _get(s.port)                     # same address: the oldest goes
        assert served.startswith(b"HTTP/1.1 200"), served
        assert s.shed("evicted") == 1
        assert (await _closed(idle[0][0])).startswith(b"HTTP/1.1 503")
        for _reader, writer in idle:
            writer.close()


async def test_a_full_listener_closes_its_oldest_idle_connection_for_a_newcomer() -> None:
    limits = replace(FAST, max_connections=12, max_per_address=4)
    async with listening(limits) as s:
        idle = [await _connect(s.port, f"127.0.0.{10 + i // 4}") for i in range(12)]
        await until(lambda: len(s.table.conns) == 12, "the listener full")
        served = await _get(s.port, "/ok", "127.0.0.99")
        assert served.startswith(b"HTTP/1.1 200"), served
        assert s.shed("evicted") >= 1 and len(s.table.conns) <= 12
        for _reader, writer in idle:
            writer.close()


async def test_heads_are_bounded_one_by_one_and_together() -> None:
    limits = replace(FAST, head_timeout=30.0, keepalive_timeout=30.0, max_head_bytes=16_000,
                     heads_budget_bytes=40_000, max_per_address=64)
    async with listening(limits) as s:
        reader, writer = await _connect(s.port)
        writer.write(b"GET /ok HTTP/1.1\r\n" + b"X-Big: " + b"a" * 8000 + b"\r\n" * 1)
        writer.write(b"X-Big2: " + b"a" * 8000 + b"\r\n")
        assert (await _closed(reader)).startswith(b"HTTP/1.1 431")
        assert s.shed("head_too_large") == 1
        writer.close()
        partial = []
        for i in range(6):                  # 6 x 8 kB in progress > 40 kB: the oldest go
            reader, writer = await _connect(s.port)
            writer.write(b"GET /ok HTTP/1.1\r\nX-Part: " + b"b" * 8000 + b"\r\n")
            await writer.drain()
            partial.append((reader, writer))
            await until(lambda n=i + 1: len(s.table.heads) + s.shed("head_memory") >= n,
                        "the head counted")
        first = await _closed(partial[0][0])
        assert first.startswith(b"HTTP/1.1 503"), first
        assert s.shed("head_memory") >= 1
        assert s.table.head_bytes <= limits.heads_budget_bytes
        assert (await _get(s.port)).startswith(b"HTTP/1.1 200")
        for _reader, writer in partial:
            writer.close()


async def test_a_caller_that_hangs_up_cancels_its_handler() -> None:
    async with listening() as s:
        _reader, writer = await _connect(s.port)
        writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: s.started, "the handler running")
        writer.close()
        await until(lambda: s.cancelled, "the handler cancelled")
        assert s.cancelled == ["/hold"]


def test_the_aiohttp_fields_the_listener_reads_still_exist() -> None:
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.web_protocol import RequestHandler

    assert "_request_count" in RequestHandler.__slots__
    assert "_reading_paused" in BaseProtocol.__slots__


def test_caps_leave_room_below_the_file_limit() -> None:
    for nofile in (256, 1024, 4096, 16384, 1 << 20):
        admin, public = listener_limits(nofile)
        if nofile <= 16384:
            assert admin.max_connections + public.max_connections < nofile
        assert public.max_per_address < public.max_connections
        assert admin.max_per_address == admin.max_connections
    admin, public = listener_limits(16384)       # the unit's LimitNOFILE: as documented
    assert (admin.max_connections, public.max_connections, public.max_per_address) == \
        (1024, 10_000, 312)


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("2001:db8:1:2::9", "2001:db8:1:2::/64")])
def test_an_ipv6_slash_64_counts_as_one_address(host: str, key: str) -> None:
    assert address_unit(host) == key
