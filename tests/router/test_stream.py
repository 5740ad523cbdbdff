"""Long and streaming requests through real agents: caller's router -> worker's gateway ->
a real streaming upstream (issue 17 item 4).

One network for the module: coordinator ``c1`` is the caller (its router, ``/route/``);
workers ``w1`` and ``w2`` both serve ``tok`` in front of the same
:class:`~tests.router.stream_upstream.StreamUpstream`, so a retry on the other worker
would show as a second hit on the same request id. Every agent has
``gateway.upstream_timeout = T``: the router and the gateway both bound *silence*, not
the length of a stream.

Shown here: SSE and NDJSON parts arrive one by one (each is read before the upstream
writes the next: the upstream waits for the test's acknowledgement); a silence longer than
``T`` cuts a stream while one that keeps sending outlives the router's whole per-attempt
budget; a caller hanging up — mid-stream, while waiting for the first byte, mid-upload —
reaches the upstream; nothing is retried once the answer started (and the same failure
before the answer started is retried, so the check can fail). The tests run in file
order; the last one leaves both workers backed off.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.http.forwarding import reset
from tests.cluster import Cluster, Node, wait_until
from tests.router.stream_upstream import StreamUpstream

pytestmark = pytest.mark.slow

T = 1.5                    # gateway.upstream_timeout of every agent here (seconds)
GONE_S = 10.0              # generous bound for a hang-up to reach the upstream (bench: <= 1 s)
_ids = itertools.count()


class Net:
    def __init__(self, cl: Cluster, c1: Node, workers: list[Node], up: StreamUpstream) -> None:
        self.cl, self.c1, self.workers, self.up = cl, c1, workers, up

    def route(self, path: str) -> str:
        return f"{self.c1.url}/route/tok{path}"

    def stats(self, node: Node) -> dict[str, Any]:
        status, body = node.get("/api/dht/stats")
        assert status == 200, body
        return dict(body)


def new_id(name: str) -> str:
    return f"{name}-{next(_ids)}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    up = StreamUpstream().start()
    tmp = Path(tmp_path_factory.mktemp("stream"))
    try:
        with Cluster(tmp, record_ttl=30, republish=3) as cl:
            c1 = cl.coordinator("c1", extra={"gateway": {"upstream_timeout": T}})
            cl.start(c1)
            cl.wait_ready(c1)
            workers = [cl.worker(name, [c1.dht_addr], services=["tok"], extra={
                "gateway": {"upstream_timeout": T, "upstreams": {"tok": up.url}}})
                for name in ("w1", "w2")]
            for w in workers:
                w.data["worker"]["endpoint"] = w.gateway_url
            cl.start(*workers)
            cl.wait_ready(*workers)
            wait_until(lambda: c1.providers("tok")[0] >= {"w1", "w2"}, 30,
                       "both workers announced")
            yield Net(cl, c1, workers, up)
    finally:
        up.stop()


async def read_part(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """Exactly ``size`` bytes of the answer (a part may come in pieces, never merged with
    the next one: that is only written after this one was acknowledged)."""
    got = b""
    while len(got) < size:
        chunk = await asyncio.wait_for(resp.content.readany(), 10)
        assert chunk, f"the stream ended after {got!r}"
        got += chunk
    return got


async def idle_everywhere(net: Net) -> None:
    """Every gateway and the router hold no request any more (slots freed)."""
    def idle() -> bool:
        if net.stats(net.c1)["router_detail"]["workers"]["workers_in_flight"]:
            return False
        return all(net.stats(w)["gateway"]["inflight"] == 0 for w in net.workers)
    await asyncio.to_thread(wait_until, idle, 10, "no request in flight anywhere")


# ---------------------------------------------------------------------------- tests
def _sse(i: int) -> bytes:
    return f"id: {i}\ndata: token {i}\n\n".encode()


def _ndjson(i: int) -> bytes:
    return (json.dumps({"token": i}) + "\n").encode()


@pytest.mark.parametrize(("path", "ctype", "render"), [
    ("/sse?head_first=1", "text/event-stream", _sse),
    ("/ndjson?head_first=1", "application/x-ndjson", _ndjson),
    ("/ndjson?declared=1", "application/x-ndjson", _ndjson),
])
async def test_stream_arrives_part_by_part_through_router_and_gateway(
        net: Net, path: str, ctype: str, render: Any) -> None:
    """The head first (before the upstream writes anything else), then each part before
    the upstream writes the next — also for a stream that announces its length."""
    cid, n = new_id("parts"), 6
    declared = "declared=1" in path
    async with aiohttp.ClientSession(auto_decompress=False) as s, \
            s.get(net.route(f"{path}&id={cid}&n={n}")) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
        assert "RMA-Worker" in r.headers and r.headers["RMA-Attempts"] == "1"
        assert "Content-Encoding" not in r.headers
        assert ("Content-Length" in r.headers) == declared
        call = net.up.calls[cid]
        if not declared:
            assert call.sent == []               # the head came through on its own
            net.up.ack(cid, -1)
        for i in range(n):
            part = render(i)
            assert await read_part(r, len(part)) == part
            # part i is here, and the upstream has not written part i + 1: it waits for us
            assert len(call.sent) == i + 1
            net.up.ack(cid, i)
        assert await asyncio.wait_for(r.content.read(), 10) == b""
    assert call.hits == 1


async def test_silence_longer_than_the_timeout_cuts_the_stream(net: Net) -> None:
    """One part, then silence: the stream breaks (never ends cleanly: the caller must not
    take a cut answer for a whole one) and the upstream learns its caller is gone."""
    cid = new_id("silent")
    async with aiohttp.ClientSession() as s, s.get(net.route(f"/silent?id={cid}")) as r:
        assert r.status == 200
        assert await read_part(r, 9) == b"data: 0\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.content.read(), 10 * T)
    assert await net.up.wait(cid, "gone", GONE_S)
    call = net.up.calls[cid]
    assert call.gone_at - call.sent[0] >= T          # cut by the silence, not before
    await idle_everywhere(net)


async def test_a_stream_that_keeps_sending_outlives_the_per_attempt_budget(net: Net) -> None:
    """Gaps of T/6, for longer than the router's whole budget for one attempt
    (connect + upstream_timeout): the timeouts bound silence, not length."""
    budget = net.stats(net.c1)["router_detail"]["attempt_budget_s"]
    gap = T / 6
    n = int(budget / gap) + 4
    cid = new_id("long")
    async with aiohttp.ClientSession() as s, \
            s.get(net.route(f"/gaps?id={cid}&n={n}&gap={gap}")) as r:
        assert r.status == 200
        body = await asyncio.wait_for(r.read(), budget + 30)
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(n))
    call = net.up.calls[cid]
    assert call.sent[-1] - call.sent[0] > budget and call.hits == 1


async def test_hang_up_mid_stream_reaches_the_upstream(net: Net) -> None:
    cid = new_id("hangup")
    async with aiohttp.ClientSession() as s:
        r = await s.get(net.route(f"/sse?id={cid}&n=5"))
        assert r.status == 200
        await read_part(r, len(b"id: 0\ndata: token 0\n\n"))
        r.close()                                      # the caller goes away
    assert await net.up.wait(cid, "gone", GONE_S)
    assert len(net.up.calls[cid].sent) == 1
    await idle_everywhere(net)


async def test_hang_up_before_the_first_byte_reaches_the_upstream(net: Net) -> None:
    cid = new_id("hold")
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.get(net.route(f"/hold?id={cid}")))
        assert await net.up.wait(cid, "first", GONE_S)   # the upstream has the request
        assert not pending.done(), "answered before the hang-up (timeout too short?)"
        pending.cancel()                                # the caller goes away
        with pytest.raises(asyncio.CancelledError):
            await pending
    assert await net.up.wait(cid, "gone", GONE_S)
    await idle_everywhere(net)


async def test_hang_up_mid_upload_reaches_the_upstream(net: Net) -> None:
    """More than the router buffers for a retry (1 MiB), so the upload streams through
    both hops while the caller is still sending; then the caller goes."""
    cid = new_id("upload")
    hold = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(24):
            yield b"u" * 65536                       # 1.5 MiB
        await hold.wait()                            # ... and the rest never comes
        yield b"never"

    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.post(net.route(f"/upload?id={cid}"), data=body()))
        assert await net.up.wait(cid, "first", GONE_S)   # bytes reached the upstream
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    assert await net.up.wait(cid, "gone", GONE_S)
    assert net.up.calls[cid].hits == 1
    await idle_everywhere(net)



async def test_reset_by_a_caller_whose_upload_backed_up_reaches_the_upstream(net: Net) -> None:
    """The upstream reads slowly, so the upload backs up: every hop stops reading the one
    before, and a paused socket is not watched for the caller's reset. The caller resets
    its connection (as a router of this agent does to a gateway when its own caller
    goes); the listeners' sweep notices the dead peer, and the reset travels on."""
    cid = new_id("backed")
    _reader, writer = await asyncio.open_connection(net.c1.ip, net.c1.http_port)
    writer.write(f"POST /route/tok/upload?id={cid}&slow=0.2 HTTP/1.1\r\n"
                 f"Host: {net.c1.ip}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    frame = b"10000\r\n" + b"b" * 65536 + b"\r\n"
    sent, backed_up = 0, False
    try:
        while sent < 256 << 20:
            writer.write(frame)
            sent += 65536
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                backed_up = True          # nobody on the way reads any more
                break
        assert backed_up, f"{sent} bytes went through without backing up"
        assert await net.up.wait(cid, "first", GONE_S)
    finally:
        reset(writer.transport)           # the caller goes: RST
    assert await net.up.wait(cid, "gone", GONE_S)
    assert net.up.calls[cid].body_bytes < sent
    await idle_everywhere(net)


async def test_nothing_is_retried_after_the_first_byte(net: Net) -> None:
    """An idempotent GET whose stream breaks after its first part: the caller gets the
    part and a broken connection, and no other worker is asked."""
    before = net.stats(net.c1)["router_detail"]
    cid = new_id("break")
    async with aiohttp.ClientSession() as s, s.get(net.route(f"/break?id={cid}")) as r:
        assert r.status == 200 and r.headers["RMA-Attempts"] == "1"
        assert await read_part(r, 9) == b"data: 0\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.content.read(), 10)
    after = net.stats(net.c1)["router_detail"]
    assert net.up.calls[cid].hits == 1
    assert after["outcomes"]["aborted"] == before["outcomes"]["aborted"] + 1
    assert sum(after["retries_by_reason"].values()) == sum(before["retries_by_reason"].values())


async def test_an_upload_that_keeps_sending_outlives_the_per_attempt_budget(net: Net) -> None:
    """The request side too: a body trickling in for longer than the router's budget for
    one attempt (its parts T/6 apart) is forwarded whole and answered."""
    budget = net.stats(net.c1)["router_detail"]["attempt_budget_s"]
    gap = T / 6
    n = int(budget / gap) + 4
    cid = new_id("slowup")

    async def body() -> AsyncIterator[bytes]:
        yield b"u" * (1 << 20) + b"u"        # past the router's retry buffer: streamed
        for _ in range(n):
            await asyncio.sleep(gap)
            yield b"u" * 1000

    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s, \
            s.post(net.route(f"/upload?id={cid}&answer=1"), data=body()) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["bytes"] == (1 << 20) + 1 + 1000 * n
    assert time.monotonic() - t0 > budget


async def test_the_same_failure_before_the_first_byte_is_retried(net: Net) -> None:
    """The contrast that makes the test above able to fail: when the upstream breaks
    before any byte of the answer, the idempotent GET is tried on the other worker.
    Last in the module: both workers are backed off afterwards."""
    cid = new_id("break0")
    async with aiohttp.ClientSession() as s, s.get(net.route(f"/break?id={cid}&at=0")) as r:
        assert r.status == 502
        assert r.headers["RMA-Attempts"] == "2"
        await r.read()
    assert net.up.calls[cid].hits >= 2
