"""A running agent under a flood of hostile datagrams (real process, real UDP).

20 000 datagrams of junk, truncated envelopes, oversized payloads and well-formed calls
of unknown RPCs: the agent keeps serving, counts every drop by reason in /metrics, and
its log stays short (peer-triggered lines are rate-limited).
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from tests.util import agent_cmd, agent_env, coordinator_config, http_get, stop_process, wait_for

pytestmark = pytest.mark.slow


def _hostile(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    msg_id = os.urandom(20)
    if kind == 0:
        return os.urandom(rng.randrange(0, 64))                       # noise, often short
    if kind == 1:
        return b"\x00" + msg_id + os.urandom(rng.randrange(1, 400))  # request, bad msgpack
    if kind == 2:
        return b"\x00" + msg_id + msgpack.packb(["no_such_rpc", [1, 2]])
    if kind == 3:
        return b"\x00" + msg_id + msgpack.packb(["find_node", [b"short", 7]])
    if kind == 4:
        return b"\x01" + msg_id + msgpack.packb({"records": [b"x"]})  # unsolicited reply
    return b"\x00" + msg_id + b"\x91" + b"\xc4" * 9000                # oversized


def _drops(metrics: str) -> float:
    return sum(float(v) for v in re.findall(
        r'^rma_agent_dht_dropped_datagrams_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))


def test_flood_is_counted_dropped_and_quiet(tmp_path: Path) -> None:
    cfg, http = coordinator_config(tmp_path)
    udp = int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', cfg.read_text()).group(1))
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(agent_cmd("run", "-c", str(cfg)), env=agent_env(),
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    base = f"http://127.0.0.1:{http}"
    try:
        wait_for(lambda: http_get(base + "/healthz")[0] == 200, what="agent up")
        lines_before = len(log.read_text().splitlines())
        rng = random.Random(7)
        sent = 0
        deadline = time.monotonic() + 20
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while sent < 20_000 and time.monotonic() < deadline:
                try:
                    s.sendto(_hostile(rng), ("127.0.0.1", udp))
                except OSError:                 # e.g. EMSGSIZE never applies on lo; be safe
                    pass
                sent += 1
                if sent % 50 == 0:
                    time.sleep(0.005)           # ~10k/s: what the kernel drops is not ours to count
        # every kind of datagram above is dropped by the agent; allow for what the kernel
        # itself dropped when the socket buffer was full
        wait_for(lambda: _drops(http_get(base + "/metrics")[1]) >= 0.8 * sent, 15,
                 what="drops counted")
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 200
        metrics = http_get(base + "/metrics")[1]
        reasons = set(re.findall(r'rma_agent_dht_dropped_datagrams_total\{reason="([^"]+)"\}',
                                 metrics))
        assert len(reasons) >= 3, reasons
    finally:
        assert stop_process(proc) == 0
    text = log.read_text()
    assert "Traceback" not in text
    assert len(text.splitlines()) - lines_before < 60, text[-3000:]
