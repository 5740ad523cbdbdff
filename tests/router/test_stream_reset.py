"""The two socket rules behind hang-up propagation, on real loopback sockets (no agents):
:func:`agent.http.forwarding.reset` sends RST even with unsent bytes queued (a plain
close would queue its FIN behind them, unseen by a peer that does not read), and :func:`agent.http.listener.peer_gone` sees a peer
that reset or closed a connection we are not reading.
"""

from __future__ import annotations

import asyncio

from agent.http.forwarding import reset
from agent.http.listener import peer_gone
from tests.util import wait_for_async


class _Sink(asyncio.Protocol):
    """The accepting side: never reads (its transport is paused at once)."""

    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()


async def _pair() -> tuple[_Sink, asyncio.StreamWriter, asyncio.AbstractServer]:
    sink = _Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    await wait_for_async(lambda: sink.transport is not None, what="accepted")
    return sink, writer, server


async def test_reset_reaches_a_peer_that_does_not_read_past_queued_bytes() -> None:
    sink, writer, server = await _pair()
    try:
        assert not peer_gone(sink.transport)
        writer.write(b"x" * (64 << 20))         # far more than the socket buffers hold
        reset(writer.transport)
        await wait_for_async(lambda: peer_gone(sink.transport), what="the reset seen")
    finally:
        server.close()
        if sink.transport is not None:
            sink.transport.abort()


async def test_a_close_with_nothing_queued_is_seen() -> None:
    sink, writer, server = await _pair()
    try:
        writer.close()                          # FIN at once: the socket is CLOSE_WAIT
        await wait_for_async(lambda: peer_gone(sink.transport), what="the FIN seen")
    finally:
        server.close()
        if sink.transport is not None:
            sink.transport.abort()


def test_no_transport_is_not_gone() -> None:
    assert not peer_gone(None)
