"""TunnelComponent against a real process: the cloudflared stand-in
(``tests/tools/fake_cloudflared.py``, a stand-in because cloudflared cannot be
downloaded here) serving /ready and /quicktunnel on a free loopback port."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from agent.config import Address, Config, TunnelSection
from agent.lifecycle import Agent
from agent.tunnel import TunnelComponent
from tests.util import free_port, wait_for
from tests.util import wait_for_async as until

FAKE = Path(__file__).resolve().parent / "tools" / "fake_cloudflared.py"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class FakeCloudflared:
    """The stand-in as a real subprocess; ``start()`` waits until it listens."""

    def __init__(self, port: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.port, self.args, self.env = port, args, env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeCloudflared:
        cmd = [sys.executable, str(FAKE), "--no-autoupdate", "--metrics",
               f"127.0.0.1:{self.port}", "tunnel", *self.args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc = self.proc

        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return _listening(self.port)

        # it installs its signal handlers before it listens: signals are safe from here
        wait_for(listening, 10, 0.05, "the stand-in listening")
        return self

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def hostname(self) -> str:
        return str(self.get("/quicktunnel")[1]["hostname"])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        return rc


QUICK = ("--loglevel", "info", "--url", "http://127.0.0.1:8090")     # the gateway


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeCloudflared]]:
    """Factory of stand-in processes, all stopped at the end of the test."""
    started: list[FakeCloudflared] = []

    def make(port: int, *args: str, env: dict[str, str] | None = None) -> FakeCloudflared:
        f = FakeCloudflared(port, *args, env=env).start()
        started.append(f)
        return f

    yield make
    for f in started:
        f.stop()


def make_agent(mode: str, port: int, hostname: str = "") -> tuple[Agent, TunnelComponent,
                                                                   list[str]]:
    """A real Agent (no HTTP started) with only the tunnel component; records events."""
    cfg = replace(Config(), tunnel=TunnelSection(mode=mode, metrics=Address("127.0.0.1", port),
                                                  hostname=hostname))
    agent = Agent(cfg, components=[])
    agent.running = True          # as after Agent.start(): events are delivered at once
    comp = TunnelComponent(agent)
    agent.components.append(comp)
    comp.poll_fast, comp.poll_slow, comp.backoff_max = 0.05, 0.2, 0.4
    comp.request_timeout = 1.0
    events: list[str] = []
    agent.subscribe("endpoint", events.append)
    return agent, comp, events


async def test_quick_tunnel_learns_and_reannounces(fakes: Callable[..., FakeCloudflared]) -> None:
    port = free_port()
    fake = fakes(port, *QUICK)
    agent, comp, events = make_agent("quick", port)
    await comp.start()
    try:
        await until(lambda: comp.ready()[0], what="tunnel ready")
        first = fake.hostname()
        assert comp.endpoint == f"https://{first}"
        assert events == [f"https://{first}"]
        assert comp.status() == "tunnel=up"
        st = comp.stats()["tunnel"]
        assert st["mode"] == "quick" and st["endpoint"] == comp.endpoint and st["ready"] is True
        assert st["last_error"] is None and st["ready_connections"] == 4
        text = generate_latest(agent.registry).decode()
        assert "rma_agent_tunnel_up 1.0" in text

        fake.signal(signal.SIGUSR1)                # the quick tunnel gets a new name
        await until(lambda: len(events) == 2, what="second endpoint event")
        second = fake.hostname()
        assert second != first
        assert events == [f"https://{first}", f"https://{second}"]
        assert comp.endpoint == f"https://{second}" and comp.endpoint_changes == 1
        assert "rma_agent_tunnel_endpoint_changes_total 1.0" in \
            generate_latest(agent.registry).decode()
    finally:
        await comp.stop()
    assert comp._task is None and comp._session is None


async def test_not_ready_until_edge_connection(fakes: Callable[..., FakeCloudflared]) -> None:
    port = free_port()
    fakes(port, *QUICK, env={"FAKE_CLOUDFLARED_READY_DELAY": "1.0"})
    _agent, comp, events = make_agent("quick", port)
    await comp.start()
    try:
        await until(lambda: comp.endpoint is not None, what="hostname")
        ok, why = comp.ready()
        assert not ok
        assert why == (f"tunnel: waiting for cloudflared at http://127.0.0.1:{port}: "
                       "cloudflared has no connection to the Cloudflare edge yet")
        assert comp.status() == "tunnel=down"
        assert len(events) == 1                   # the URL is known before the edge is up
        await until(lambda: comp.ready()[0], what="edge connection")
        assert comp.status() == "tunnel=up"
    finally:
        await comp.stop()


async def test_cloudflared_down_then_back(fakes: Callable[..., FakeCloudflared],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rma_agent.tunnel")
    port = free_port()
    fake = fakes(port, *QUICK)
    _agent, comp, events = make_agent("quick", port)
    await comp.start()
    try:
        await until(lambda: comp.ready()[0], what="tunnel ready")
        first = comp.endpoint
        assert fake.stop() == 0                   # stand-in exits 0 on SIGTERM
        await until(lambda: not comp.ready()[0], what="not ready after cloudflared stopped")
        why = comp.ready()[1]
        assert why.startswith(f"tunnel: waiting for cloudflared at http://127.0.0.1:{port}: "
                              "metrics server unreachable: ")
        assert "rma-tunnel" in why
        assert comp.status() == "tunnel=down"
        assert comp.stats()["tunnel"]["last_error"].startswith("metrics server unreachable")
        assert comp.endpoint == first             # last known URL is kept, not re-emitted
        await until(lambda: comp._failures >= 4, what="several failed polls")
        unreachable_lines = [r for r in caplog.records if "cannot reach" in r.getMessage()]
        assert len(unreachable_lines) == 1        # logged once, not per poll

        fakes(port, *QUICK)                       # restarted: a new quick hostname
        await until(lambda: comp.ready()[0], what="ready again")
        assert comp.endpoint != first and len(events) == 2 and events[-1] == comp.endpoint
        up_lines = [r for r in caplog.records if r.getMessage().startswith("tunnel up")]
        assert len(up_lines) == 2
    finally:
        await comp.stop()


async def test_backoff_is_capped_while_unreachable() -> None:
    port = free_port()                            # nothing listens there
    _agent, comp, events = make_agent("quick", port)
    comp.poll_fast, comp.backoff_max = 0.05, 0.4
    attempts: list[float] = []
    real_get = comp._get

    async def counting_get(path: str) -> tuple[int, Any]:
        attempts.append(time.monotonic())
        return await real_get(path)

    comp._get = counting_get  # type: ignore[method-assign]
    await comp.start()
    try:
        await until(lambda: len(attempts) >= 7, what="seven attempts")
    finally:
        await comp.stop()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # planned: 0.05, 0.1, 0.2, 0.4, 0.4, 0.4 — doubling, then capped (slack for a busy box)
    assert gaps[0] < gaps[3]
    assert sorted(gaps[3:])[1] >= 0.38
    assert all(g < 0.4 + 1.0 for g in gaps)
    assert events == [] and comp.endpoint is None
    assert not comp.ready()[0] and "Connection refused" in comp.ready()[1]


async def test_named_tunnel_uses_configured_hostname(
        fakes: Callable[..., FakeCloudflared]) -> None:
    port = free_port()
    fake = fakes(port, "--config", "/etc/rma-agent/cloudflared.yml", "run", "rma",
                 env={"FAKE_CLOUDFLARED_READY_DELAY": "0.5"})
    assert fake.get("/quicktunnel")[0] == 404
    _agent, comp, events = make_agent("named", port, hostname="worker-1.example.org")
    await comp.start()
    try:
        assert events == ["https://worker-1.example.org"]    # known at once
        assert not comp.ready()[0]
        await until(lambda: comp.ready()[0], what="named tunnel ready")
        assert comp.endpoint == "https://worker-1.example.org"
        assert comp.last_error == "" and events == ["https://worker-1.example.org"]
    finally:
        await comp.stop()


async def test_quick_mode_against_a_named_cloudflared(
        fakes: Callable[..., FakeCloudflared]) -> None:
    """Real cloudflared answers {"hostname":""} for named tunnels; the stand-in 404s."""
    for env in ({}, {"FAKE_CLOUDFLARED_NAMED_QUICKTUNNEL": "empty"}):
        port = free_port()
        fakes(port, "run", "rma", env=env)
        _agent, comp, events = make_agent("quick", port)
        await comp.start()
        try:
            await until(lambda c=comp: c.reachable and c.up, what="polled")
            ok, why = comp.ready()
            assert not ok and "runs no quick tunnel" in why and 'tunnel.mode = "named"' in why
            assert events == []
        finally:
            await comp.stop()


async def test_named_mode_against_a_quick_cloudflared(
        fakes: Callable[..., FakeCloudflared]) -> None:
    """tunnel.hostname is not routed to a quick tunnel: not ready, and said why."""
    port = free_port()
    fake = fakes(port, *QUICK)
    _agent, comp, _events = make_agent("named", port, hostname="w1.example.org")
    await comp.start()
    try:
        await until(lambda: comp.reachable and comp.up, what="polled")
        await until(lambda: comp.misconfigured, what="mismatch seen")
        ok, why = comp.ready()
        assert not ok and f"runs a quick tunnel ({fake.hostname()})" in why
        assert "w1.example.org" in why and comp.status() == "tunnel=down"
    finally:
        await comp.stop()


async def test_mode_off_does_nothing() -> None:
    _agent, comp, events = make_agent("off", free_port())
    await comp.start()
    assert comp._task is None and comp.endpoint is None
    assert comp.ready() == (True, "")
    assert comp.status() == ""
    assert comp.stats() == {"tunnel": {"mode": "off", "endpoint": None, "ready": True,
                                       "last_error": None, "metrics": str(comp.cfg.metrics),
                                       "origin": str(_agent.config.gateway.listen),
                                       "ready_connections": 0, "endpoint_changes": 0}}
    await comp.stop()
    assert events == []


async def test_reload_follows_new_metrics_address(fakes: Callable[..., FakeCloudflared]) -> None:
    p1, p2 = free_port(), free_port()
    fakes(p1, *QUICK)
    agent, comp, events = make_agent("quick", p1)
    await comp.start()
    try:
        await until(lambda: comp.ready()[0], what="first tunnel")
        second = fakes(p2, *QUICK)
        old = agent.config
        new = replace(old, tunnel=replace(old.tunnel, metrics=Address("127.0.0.1", p2)))
        agent.config = new
        await comp.reload(old, new)
        await until(lambda: comp.endpoint == f"https://{second.hostname()}", what="new URL")
        await until(lambda: comp.ready()[0], what="second tunnel ready")
        assert len(events) == 2

        off = replace(new, tunnel=replace(new.tunnel, mode="off"))
        agent.config = off
        await comp.reload(new, off)
        assert comp.ready() == (True, "") and comp.endpoint is None and comp._task is None
        assert len(events) == 3 and events[-1] == ""    # the tunnel URL is gone
    finally:
        await comp.stop()


async def test_hostile_metrics_server_never_crashes_the_watcher() -> None:
    """Garbage from whatever listens on the metrics port: not ready, with a reason."""
    answers: dict[str, Callable[[], web.Response]] = {}

    async def handler(request: web.Request) -> web.Response:
        return answers[request.path]()

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    _agent, comp, events = make_agent("quick", port)
    cases: list[tuple[Callable[[], web.Response], Callable[[], web.Response], str]] = [
        (lambda: web.Response(text="not json"), lambda: web.Response(text="{"),
         "unexpected answer"),
        (lambda: web.json_response({"readyConnections": "x"}),
         lambda: web.json_response({"hostname": "evil host/.."}), "unusable hostname"),
        (lambda: web.json_response([1, 2]), lambda: web.json_response({"hostname": 7}),
         "unexpected answer"),
        (lambda: web.Response(status=500), lambda: web.Response(body=b"x" * 300_000),
         "unexpected HTTP 500"),
    ]
    try:
        await comp.start()
        for ready, quick, expect in cases:
            answers["/ready"], answers["/quicktunnel"] = ready, quick
            comp.poll_now()
            await until(lambda e=expect: e in comp.ready()[1], what=expect)
            assert comp.endpoint is None and events == []
        answers["/ready"] = lambda: web.json_response({"status": 200, "readyConnections": 2})
        answers["/quicktunnel"] = lambda: web.json_response(
            {"hostname": "Ok-Name.trycloudflare.com"})
        await until(lambda: comp.ready()[0], what="ready on a sane answer")
        assert events == ["https://ok-name.trycloudflare.com"]
    finally:
        await comp.stop()
        await runner.cleanup()


# --- the stand-in itself (the systemd test relies on its CLI) ---------------------------

def test_stand_in_cli_shapes() -> None:
    run = [sys.executable, str(FAKE)]
    out = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and "stand-in" in out.stdout
    out = subprocess.run([*run, "tunnel"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and " ERR " in out.stderr
    out = subprocess.run([*run, "tunnel", "--metrics", "nonsense"], capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 2
    with socket.socket() as busy:                 # metrics address taken -> exit 1
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([*run, "--metrics", f"127.0.0.1:{port}", "tunnel", "--url",
                              "http://x"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 1 and "failed to bind" in out.stderr
    assert os.access(FAKE, os.X_OK)
    assert "stand-in" in FAKE.read_text().split('"""')[1].lower()


def test_stand_in_log_format_and_unknown_flags(fakes: Callable[..., FakeCloudflared]) -> None:
    port = free_port()
    fake = fakes(port, "--protocol=quic", "--ha-connections", "2", "--weird-bool", "--url",
                 "http://127.0.0.1:8090")
    status, body = fake.get("/ready")
    assert status == 200 and body["readyConnections"] == 4 and body["status"] == 200
    assert body["connectorId"]
    assert fake.hostname().endswith(".trycloudflare.com")
    assert fake.stop() == 0


def test_stand_in_logs_like_cloudflared() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), "--metrics", f"127.0.0.1:{port}",
                             "tunnel", "--url", "http://127.0.0.1:8090"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # listening means its handlers are set (they come first): SIGTERM is graceful
        wait_for(lambda: proc.poll() is None and _listening(port), 10, 0.05,
                 "the stand-in listening")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    lines = err.strip().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INF|WRN|ERR|DBG) ", ln)
               for ln in lines), lines
    assert any(".trycloudflare.com" in ln for ln in lines)
    assert any("Starting metrics server on 127.0.0.1:" in ln for ln in lines)
    assert "graceful shutdown" in lines[-2]


async def test_endpoint_waits_until_the_agent_runs(fakes: Callable[..., FakeCloudflared]) -> None:
    """The worker subscribes in its start(), after the tunnel's: nothing may be lost."""
    port = free_port()
    fakes(port, *QUICK)
    for mode, host in (("named", "w1.example.org"), ("quick", "")):
        agent, comp, events = make_agent(mode, port, hostname=host)
        agent.running = False                       # still starting components
        polls: list[str] = []
        real_get = comp._get

        async def counting_get(path: str, real_get=real_get, polls=polls) -> tuple[int, Any]:
            polls.append(path)
            return await real_get(path)

        comp._get = counting_get  # type: ignore[method-assign]
        await comp.start()
        try:
            await until(lambda c=comp: c.endpoint is not None and c.up, what="learned")
            n = len(polls)                          # each poll is followed by a flush
            await until(lambda p=polls, n=n: len(p) >= n + 3, what="three more polls")
            assert events == []                     # held back while starting
            agent.running = True                    # every start() returned
            await until(lambda e=events: len(e) == 1, what="deferred event")
            assert events == [comp.endpoint]
        finally:
            await comp.stop()
