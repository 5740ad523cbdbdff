"""LoadWatch against a real HTTP server on loopback: what one poll keeps, what it counts
and ignores (an unreadable, huge, failing or slow answer never reaches the load), the
sources a server switched off, and how long a reading counts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from agent.config.model import Upstream
from agent.gateway import upstream_load as ul
from agent.gateway.kinds import MAX_BYTES, Reading

METRICS = ('vllm:num_requests_waiting{model_name="m"} 5\n'
           'vllm:num_requests_running{model_name="m"} 2\n')


class Server:
    """vLLM-style ``/metrics`` and llama.cpp-style ``/slots`` at the root; hits counted."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        if path == "/metrics":
            return web.Response(text=METRICS)
        if path == "/slots":
            return web.json_response([{"id": 0, "is_processing": True},
                                      {"id": 1, "is_processing": False}])
        return web.Response(status=404)


async def _serve(handler: web.StreamResponse | object) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{p:.*}", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_a_good_poll_is_kept_and_slots_merge_with_metrics(
        session: aiohttp.ClientSession) -> None:
    srv = Server()
    runner, url = await _serve(srv.handle)
    try:
        w = ul.LoadWatch("llm", Upstream(url + "/v1", kind="vllm"))
        await w.poll(session, 1.0)
        assert w.reading == Reading(waiting=5, running=2) and (w.bad, w.errors) == (0, 0)
        assert srv.hits["/metrics"] == 1                   # at the origin's root
        # llama.cpp: /slots and /metrics of one server, merged (both parsers are
        # llamacpp's: the vLLM metrics say nothing to it -> counted, slots kept)
        cpp = ul.LoadWatch("cpp", Upstream(url, kind="llamacpp"))
        await cpp.poll(session, 1.0)
        assert cpp.reading == Reading(running=1, slots=2) and cpp.bad == 1
        now = cpp.at
        assert cpp.fresh(now + 2.9, 1.0) is not None and cpp.fresh(now + 3.1, 1.0) is None
        assert cpp.fresh(now + 3.1, 5.0) is not None       # idle: 3 idle intervals
        assert cpp.to_json(now)["reading"] == {"running": 1, "slots": 2}
    finally:
        await runner.cleanup()


async def test_switched_off_sources_are_left_alone_for_a_while(
        session: aiohttp.ClientSession) -> None:
    hits: Counter[str] = Counter()

    async def off(request: web.Request) -> web.Response:
        hits[request.path] += 1
        if request.path == "/slots":
            return web.json_response({"error": {"code": 501, "message": "This server does "
                                      "not support slots endpoint."}}, status=501)
        return web.Response(text="llamacpp:requests_deferred 7\n"
                                 "llamacpp:requests_processing 1\n")

    runner, url = await _serve(off)
    try:
        w = ul.LoadWatch("cpp", Upstream(url, kind="llamacpp"))
        for _ in range(3):
            await w.poll(session, 1.0)
        assert w.reading == Reading(waiting=7, running=1)
        assert hits["/slots"] == 1 and hits["/metrics"] == 3 and w.bad == 0
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["garbage", "huge", "status", "slow", "refused"])
async def test_a_bad_answer_is_counted_and_the_last_reading_kept(
        session: aiohttp.ClientSession, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ul, "POLL_TIMEOUT", 0.3)
    state = {"mode": "good"}
    gave_up = asyncio.Event()        # "slow": the server answers only after the poll is over

    async def answer(request: web.Request) -> web.StreamResponse:
        m = state["mode"]
        if m == "garbage":
            return web.Response(text="vllm:num_requests_waiting {{{ lol\n")
        if m == "huge":
            return web.Response(body=b"#" * (MAX_BYTES + 10))
        if m == "status":
            return web.Response(status=500, text=METRICS)
        if m == "slow":
            await gave_up.wait()
        return web.Response(text=METRICS)

    runner, url = await _serve(answer)
    w = ul.LoadWatch("llm", Upstream(url, kind="vllm"))
    try:
        await w.poll(session, 1.0)
        assert w.reading == Reading(waiting=5, running=2)
        state["mode"] = mode
        if mode == "refused":
            await runner.cleanup()
        async with asyncio.timeout(10):          # a poll without its own timeout fails here
            await w.poll(session, 1.0)
        assert w.reading == Reading(waiting=5, running=2)   # kept, until it is stale
        assert w.polls == 2 and (w.bad + w.errors) == 1 and w.last_error
    finally:
        gave_up.set()
        await runner.cleanup()


def test_a_503_marks_full_for_a_while() -> None:
    w = ul.LoadWatch("ol", Upstream("http://127.0.0.1:1", kind="ollama"))
    w.saw_status(200, 100.0)
    assert not w.full(100.0)
    w.saw_status(503, 100.0)
    assert w.full(100.0 + ul.FULL_HOLD_S - 0.1) and not w.full(100.0 + ul.FULL_HOLD_S)
    assert w.full_seen == 1
