"""The daemon as systemd sees it: a real subprocess, a real NOTIFY_SOCKET bound here.

Nothing of the agent is mocked: we run ``python -m agent run -c CFG`` and read the
datagrams it sends to the notify socket, the way PID 1 would.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.util import (
    agent_cmd,
    agent_env,
    coordinator_config,
    free_port,
    http_get,
    stop_process,
    wait_for,
    write_config,
)

# each test starts a real agent process (with its own notify socket): a process test
pytestmark = pytest.mark.slow


class NotifyListener:
    """A unix datagram socket standing where systemd's notify socket would be."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [m for _, m in self.messages]

    def wait(self, needle: str, timeout: float = 15.0, after: int = 0) -> str:
        def found() -> str | None:
            for m in self.drain()[after:]:
                if needle in m:
                    return m
            return None
        return wait_for(found, timeout, what=f"notify message {needle!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def start(cfg: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(agent_cmd("run", "-c", str(cfg)), env=agent_env(**env),
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def test_ready_status_watchdog_stop(tmp_path: Path, notify: NotifyListener) -> None:
    cfg, http = coordinator_config(tmp_path)
    log = tmp_path / "agent.log"
    proc = start(cfg, log, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    try:
        ready = notify.wait("READY=1")
        # READY=1 only once the HTTP endpoint serves: it must answer right now
        status, body = http_get(f"http://127.0.0.1:{http}/healthz")
        assert status == 200 and body["status"] == "ok"
        assert "STATUS=" in ready or any("STATUS=" in m for m in notify.drain())
        status_line = next(m for m in notify.drain() if "STATUS=" in m)
        assert "coordinator coord" in status_line

        # WATCHDOG=1 at half of WATCHDOG_USEC (0.2 s of 0.4 s): ten pings in a row, whose
        # typical gap is that half (the median: a loaded machine may delay one ping, but
        # a loop pinging at the watchdog's own period, or flooding, is caught)
        notify.drain()
        t0 = time.monotonic()

        def pings() -> list[float]:
            notify.drain()
            return [t for t, m in notify.messages if m == "WATCHDOG=1" and t >= t0]
        # drained every 20 ms: a ping's stamp is its arrival within that
        got = wait_for(lambda: len(pings()) >= 10 and pings(), 30, interval=0.02,
                       what="ten watchdog pings")
        gaps = sorted(b - a for a, b in itertools.pairwise(got))
        assert 0.1 <= gaps[len(gaps) // 2] <= 0.35, gaps

        n = len(notify.drain())
        proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING=1", timeout=5, after=n)
        assert proc.wait(5) == 0
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "SIGTERM received" in text and "Traceback" not in text


def test_no_watchdog_without_watchdog_usec(tmp_path: Path, notify: NotifyListener) -> None:
    cfg, _ = coordinator_config(tmp_path)
    proc = start(cfg, tmp_path / "a.log", NOTIFY_SOCKET=str(notify.path))
    try:
        notify.wait("READY=1")
        # the behaviour under test is that nothing comes: 1 s is several ping periods of
        # the watchdog test above (its pings come 0.1-0.35 s apart)
        time.sleep(1.0)
        assert "WATCHDOG=1" not in notify.drain()
    finally:
        assert stop_process(proc) == 0


def test_sighup_good_and_bad_config(tmp_path: Path, notify: NotifyListener) -> None:
    cfg, http = coordinator_config(tmp_path, agent={"region": "eu-west"})
    log = tmp_path / "agent.log"
    proc = start(cfg, log, NOTIFY_SOCKET=str(notify.path))
    url = f"http://127.0.0.1:{http}/api/dht/stats"
    try:
        notify.wait("READY=1")
        assert http_get(url)[1]["region"] == "eu-west"

        # good new config: RELOADING=1, then READY=1, and the new value is live
        original = cfg.read_text()
        cfg.write_text(original.replace('"eu-west"', '"us-east"'))
        n = len(notify.drain())
        proc.send_signal(signal.SIGHUP)
        notify.wait("RELOADING=1", after=n)
        notify.wait("READY=1", after=n)
        wait_for(lambda: http_get(url)[1]["region"] == "us-east", 5, what="new region")

        # bad new config: rejected with file:line:key logged, old config kept, still serving
        bad = cfg.read_text().replace('"us-east"', '"ap-south"').replace(
            'level = "info"', 'level = "loud"')
        cfg.write_text(bad)
        n = len(notify.drain())
        proc.send_signal(signal.SIGHUP)
        notify.wait("RELOADING=1", after=n)
        notify.wait("READY=1", after=n)
        wait_for(lambda: "reload rejected" in log.read_text(), 5, what="rejection logged")
        assert re.search(rf"reload rejected: {re.escape(str(cfg))}:\d+: log\.level:", log.read_text())
        assert http_get(url)[1]["region"] == "us-east"
        assert proc.poll() is None
        assert http_get(f"http://127.0.0.1:{http}/healthz")[0] == 200
    finally:
        assert stop_process(proc) == 0


def test_broken_notify_socket_is_not_fatal(tmp_path: Path) -> None:
    cfg, http = coordinator_config(tmp_path)
    log = tmp_path / "agent.log"
    proc = start(cfg, log, NOTIFY_SOCKET=str(tmp_path / "missing.sock"))
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{http}/healthz")[0] == 200, what="healthz")
    finally:
        assert stop_process(proc) == 0
    text = log.read_text()
    assert text.count("sd_notify to") == 1, text


def _journal_lines(tmp_path: Path, journal: bool) -> list[str]:
    cfg, http = coordinator_config(tmp_path)
    log = tmp_path / ("j.log" if journal else "p.log")
    fh = log.open("wb")
    st = os.fstat(fh.fileno())
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if journal else {}
    proc = subprocess.Popen(agent_cmd("run", "-c", str(cfg)), env=agent_env(**env),
                            stdout=subprocess.DEVNULL, stderr=fh)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{http}/healthz")[0] == 200, what="healthz")
    finally:
        stop_process(proc)
        fh.close()
    return [ln for ln in log.read_text().splitlines() if ln]


def test_journal_stream_format(tmp_path: Path) -> None:
    lines = _journal_lines(tmp_path, journal=True)
    assert lines and all(re.match(r"^<[0-7]>\S", ln) for ln in lines), lines
    assert any(ln.startswith("<6>rma_agent: ") for ln in lines)
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", ln) for ln in lines), "no timestamps"


def test_plain_format_has_timestamps(tmp_path: Path) -> None:
    lines = _journal_lines(tmp_path, journal=False)
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (INFO|WARNING|DEBUG|ERROR)", ln)
                         for ln in lines), lines
    assert not any(ln.startswith("<") for ln in lines)


def test_http_endpoints_and_4xx(tmp_path: Path) -> None:
    cfg, http = coordinator_config(tmp_path)
    proc = start(cfg, tmp_path / "a.log")
    base = f"http://127.0.0.1:{http}"
    try:
        wait_for(lambda: http_get(base + "/healthz")[0] == 200, what="healthz")
        status, body = http_get(base + "/metrics")
        assert status == 200 and 'rma_agent_build_info{' in body
        assert all(ln.startswith(("#", "rma_agent_")) for ln in body.splitlines() if ln)
        status, stats = http_get(base + "/api/dht/stats")
        assert status == 200 and stats["role"] == "coordinator" and 0 < stats["uptime_s"] < 600
        status, body = http_get(base + "/no/such/thing")
        assert status == 404 and "error" in body
        req = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                              base + "/healthz"], capture_output=True, text=True)
        assert req.stdout == "405"
        # a coordinator without seeds is the first seed of an empty network: ready
        status, body = http_get(base + "/readyz")
        assert status == 200 and body == {"status": "ready"}
        # an unknown worker-only path on a coordinator, and bad JSON to a POST: 4xx JSON
        req = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", "-d", "{nope",
                              "-H", "Content-Type: application/json",
                              base + "/api/services/register"], capture_output=True, text=True)
        body_text, _, code = req.stdout.rpartition("\n")
        assert code == "400" and "error" in json.loads(body_text)
    finally:
        assert stop_process(proc) == 0


def test_bind_failure_exits_1(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg, _ = coordinator_config(tmp_path, http={"listen": f"127.0.0.1:{port}"})
        res = subprocess.run(agent_cmd("run", "-c", str(cfg)), env=agent_env(),
                             capture_output=True, text=True, timeout=20)
        assert res.returncode == 1
        assert "cannot start" in res.stderr and "Traceback" not in res.stderr
    finally:
        busy.close()


def test_cli_version_and_check_config(tmp_path: Path) -> None:
    res = subprocess.run(agent_cmd("--version"), env=agent_env(), capture_output=True, text=True)
    assert res.returncode == 0 and re.fullmatch(r"rma-agent \d+\.\d+\.\d+\n", res.stdout)
    cfg, _ = coordinator_config(tmp_path)
    res = subprocess.run(agent_cmd("check-config", "-c", str(cfg)), env=agent_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.count("\n") == 1 and "role=coordinator" in res.stdout
    bad = write_config(tmp_path / "bad.toml", {"agent": {"role": "coordinator", "name": 5},
                                                       "dht": {"ksize": 0}})
    res = subprocess.run(agent_cmd("check-config", "-c", str(bad)), env=agent_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{bad}:3: agent.name:") and lines[1].startswith(f"{bad}:6: dht.ksize:")
    res = subprocess.run(agent_cmd("frobnicate"), env=agent_env(), capture_output=True, text=True)
    assert res.returncode == 2
    res = subprocess.run(agent_cmd("run", "-c", str(tmp_path / "nope.toml")), env=agent_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and str(tmp_path / "nope.toml") in res.stderr


def test_seedless_worker_status_says_what_to_edit_in_utf8(tmp_path: Path,
                                                          notify: NotifyListener) -> None:
    cfg = write_config(tmp_path / "worker.toml", {
        "agent": {"role": "worker", "name": "w", "state_dir": str(tmp_path / "state")},
        "dht": {"listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {"listen": f"127.0.0.1:{free_port()}"},
        "worker": {"services": ["ocr"], "endpoint": "https://w.example.org"}})
    proc = start(cfg, tmp_path / "w.log", NOTIFY_SOCKET=str(notify.path))
    try:
        notify.wait("READY=1")
        line = notify.wait("edit dht.bootstrap")
        # the datagram is UTF-8: the dash survives, nothing is replaced by "?"
        assert f"no bootstrap seeds configured \u2014 edit dht.bootstrap in {cfg}" in line, line
        assert "NOT READY" in line
    finally:
        assert stop_process(proc) == 0
