"""Upstream health checks against a real HTTP server: what counts as up, when a service
goes down (two failures in a row; the very first check counts alone) and comes back."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from agent.config import Upstream
from agent.gateway import health
from tests.util import free_port


async def test_check_rules_against_a_real_server() -> None:
    def answer(status: int) -> object:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, text="x")
        return handler

    app = web.Application()
    app.router.add_get("/ok", answer(200))
    app.router.add_get("/boom", answer(503))
    app.router.add_get("/gone", answer(404))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            # no health path: any answer below 500 means the server is up (404 at "/")
            assert await health.check(s, Upstream(base)) == ""
            assert await health.check(s, Upstream(base + "/gone")) == ""
            assert "HTTP 503" in await health.check(s, Upstream(base + "/boom"))
            # a health path must answer 2xx/3xx
            assert await health.check(s, Upstream(base, "/ok")) == ""
            assert "HTTP 404" in await health.check(s, Upstream(base, "/gone"))
            dead = f"http://127.0.0.1:{free_port()}"
            assert "cannot connect" in await health.check(s, Upstream(dead))
    finally:
        await runner.cleanup()


def test_state_machine() -> None:
    st = health.UpstreamState("ocr", Upstream("http://127.0.0.1:9"))
    assert health.record(st, "refused", first=True) and st.state == "down"
    assert health.record(st, "") and st.state == "up" and st.error == ""
    assert not health.record(st, "slow once")            # one failure: still up
    assert st.state == "up" and st.fails == 1
    assert health.record(st, "refused") and st.state == "down" and st.error == "refused"
    assert not health.record(st, "refused")
    assert health.record(st, "") and st.state == "up" and st.fails == 0
    assert st.to_json()["state"] == "up" and st.checks == 6
