"""SSE primitives (agent/events.py): resume, bounds, and a reader that stops reading is
dropped — over a real aiohttp server and a real TCP socket that never reads."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent import events
from tests.util import wait_for_async


def test_replay_covers_the_gap_or_says_it_cannot():
    ch = events.Channel(events.SubscriberLimit(4), history=3)
    ids = [ch.publish("e", {"n": i}) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert ch.replay_after(ids[3]) == [ch.history[-1][1]]
    assert ch.replay_after(ids[4]) == []
    assert ch.replay_after(ids[0]) is None           # frames 1 was evicted: cannot cover
    assert ch.replay_after(None) is None
    assert ch.replay_after(ids[4] + 10) is None      # from the future (another run)
    assert ch.replay_after(ch.start_id - 1) is None  # from before this channel existed
    frame = ch.history[-1][1].decode()
    assert frame.startswith(f"id: {ids[4]}\nevent: e\ndata: ") and frame.endswith("\n\n")


def test_a_full_queue_drops_the_subscriber_and_never_grows():
    async def main() -> None:
        limit = events.SubscriberLimit(4)
        ch = events.Channel(limit, queue_size=8)
        sub = events.Subscriber(8)
        ch.subscribers.add(sub)
        for i in range(100):
            ch.publish("e", {"n": i})
        assert sub.dropped and sub.reason.startswith("slow reader")
        assert sub.queue.qsize() <= 8
        assert sub not in ch.subscribers and limit.dropped == 1

    asyncio.run(main())


def _app(ch: events.Channel, heartbeat_s: float = 30.0) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not ch.limit.try_take():
            return events.too_many("streams", ch.limit)
        last = events.parse_last_event_id(request)

        def first() -> list[bytes]:
            replay = ch.replay_after(last)
            return replay if replay is not None else [events.frame("snapshot", {"all": 1})]

        return await events.stream(request, ch, first, heartbeat_s=heartbeat_s)

    app = web.Application()
    app.router.add_get("/s", handler)
    return app


async def _read_until(resp, needle: bytes, limit: int = 1 << 16) -> bytes:
    buf = b""
    while needle not in buf:
        chunk = await asyncio.wait_for(resp.content.readany(), 5)
        assert chunk, f"stream ended before {needle!r}: {buf!r}"
        buf += chunk
        assert len(buf) < limit
    return buf


async def test_stream_resume_heartbeat_and_subscriber_bound():
    ch = events.Channel(events.SubscriberLimit(2))
    async with TestClient(TestServer(_app(ch, heartbeat_s=0.3))) as client:
        r1 = await client.get("/s")
        assert r1.status == 200
        assert r1.headers["Content-Type"].startswith("text/event-stream")
        await _read_until(r1, b"event: snapshot")
        eid = ch.publish("e", {"n": 1})
        await _read_until(r1, f"id: {eid}".encode())
        await _read_until(r1, b": ping")                     # heartbeat on a quiet stream
        later = ch.publish("e", {"n": 2})
        # resume after eid: exactly the missed frame, no snapshot
        r2 = await client.get("/s", headers={"Last-Event-ID": str(eid)})
        got = await _read_until(r2, f"id: {later}".encode())
        assert b"snapshot" not in got
        r3 = await client.get("/s")                          # over the bound of 2
        assert r3.status == 503
        assert "error" in await r3.json() and r3.headers["Retry-After"]
        r1.close()
        r2.close()
        await wait_for_async(lambda: ch.limit.current == 0, what="the slots back")


async def test_a_reader_that_stops_reading_is_dropped():
    """A real socket with a small receive buffer that never reads: the server's queue
    fills, the subscriber is dropped and its connection aborted; memory stays bounded."""
    ch = events.Channel(events.SubscriberLimit(4), queue_size=32)
    server = TestServer(_app(ch))
    await server.start_server()
    try:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (server.host, server.port))
        await loop.sock_sendall(sock, b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for_async(lambda: ch.subscribers, what="the raw socket subscribed")
        (sub,) = tuple(ch.subscribers)
        payload = {"pad": "x" * 4000}
        for i in range(5000):                 # ~20 MB offered; the reader reads nothing
            ch.publish("e", {**payload, "n": i})
            if sub.dropped:
                break
            if i % 50 == 0:
                await asyncio.sleep(0)        # let the writer push into the socket
        assert sub.dropped and sub.reason.startswith("slow reader"), sub.reason
        assert sub.queue.qsize() <= 33
        await wait_for_async(lambda: ch.limit.current == 0, what="the dropped slot back")
        assert not ch.subscribers
        # the server cut the connection: reading now ends (after what was buffered)
        sock.setblocking(True)
        sock.settimeout(5)
        total = 0
        while True:
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            total += len(data)
        assert total < 8 * 1024 * 1024
        sock.close()
    finally:
        await server.close()
