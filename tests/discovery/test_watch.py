"""``GET /api/services/{name}/watch`` against real agent processes (tests/cluster.py).

One cluster for the module: a coordinator and a client-mode worker ``w0`` (a DHT client
stores no records, so a watch there can only learn changes from its periodic DHT
refresh). A second worker ``w1`` starts, changes its load and stops while we watch.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tests.cluster import Cluster
from tests.cluster import http as http_call
from tests.sse import SSEReader
from tests.util import agent_cmd, agent_env, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("watch"), record_ttl=20, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        w0 = cl.worker("w0", seeds=[c1.dht_addr], services=["ocr"], mode="client")
        cl.start(w0)
        cl.wait_ready(w0)
        wait_for(lambda: "w0" in c1.providers("ocr")[0], 20, 0.2, "w0 announced")
        yield cl, c1, w0


def _named(name: str, kind: str):
    return lambda ev: ev[1] == kind and ev[2].get("worker", {}).get("name") == name


def test_watch_sees_add_change_remove_in_order_and_resumes(cluster):
    cl, c1, w0 = cluster
    # w0 is a DHT client: it stores nothing, so only its periodic refresh can see w1
    rd = SSEReader(w0.ip, w0.http_port, "/api/services/ocr/watch")
    assert rd.status == 200
    eid, kind, snap = rd.next()
    assert kind == "snapshot" and eid
    assert [w["name"] for w in snap["workers"]] == ["w0"]
    cli = subprocess.Popen(agent_cmd("watch", "ocr", "--url", c1.url), env=agent_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        w1 = cl.worker("w1", seeds=[c1.dht_addr], services=["ocr"], mode="client")
        cl.start(w1)
        got = rd.until(_named("w1", "added"), 20, "added w1")
        added_id = got[-1][0]
        assert http_call("PUT", w1.url + "/api/worker/load", {"inflight": 3})[0] == 200
        got = rd.until(_named("w1", "changed"), 15, "changed w1")
        assert "load" in got[-1][2]["fields"] and got[-1][2]["worker"]["load"] == 3.0
        assert cl.stop(w1) == 0
        got = rd.until(_named("w1", "removed"), 15, "removed w1")
        assert got[-1][2]["reason"] in ("withdrawn", "gone from the DHT")
        ids = [int(e[0]) for e in got]
        assert ids == sorted(ids)
        # resume after "added": exactly what followed, in order, without a snapshot
        rd2 = SSEReader(w0.ip, w0.http_port, "/api/services/ocr/watch",
                        {"Last-Event-ID": added_id})
        replay = rd2.until(_named("w1", "removed"), 10, "replayed removal")
        kinds = [(k, d.get("worker", {}).get("name")) for _, k, d in replay]
        assert ("snapshot", None) not in kinds and kinds[0] == ("changed", "w1"), kinds
        rd2.close()
        # the CLI printed the same story (watching the coordinator, which stores records)
        lines: list[str] = []

        def cli_saw_removal() -> bool:
            line = cli.stdout.readline() if cli.stdout else ""
            lines.append(line)
            return "- removed w1" in line

        wait_for(cli_saw_removal, 15, 0, "rma-agent watch printing the removal")
        text = "".join(lines)
        assert text.index("+ added   w1") < text.index("~ changed w1") < text.index(
            "- removed w1"), text
    finally:
        cli.terminate()
        cli.wait(5)
        rd.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200_idle_watchers_cost_less_than_20_mb(cluster):
    _cl, c1, _w0 = cluster
    assert c1.proc is not None
    warm = SSEReader(c1.ip, c1.http_port, "/api/services/ocr/watch")
    assert warm.next()[1] == "snapshot"
    time.sleep(0.5)
    before = _rss_kb(c1.proc.pid)
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection((c1.ip, c1.http_port), timeout=10)
            s.sendall(b"GET /api/services/ocr/watch HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        for s in socks:                      # each got its headers and snapshot
            buf = b""
            while b"event: snapshot" not in buf:
                chunk = s.recv(65536)
                assert chunk, buf
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 200")
        _, stats = c1.get("/api/dht/stats")
        assert stats["dashboard"]["watch"]["watchers"] == 201
        time.sleep(1.0)
        after = _rss_kb(c1.proc.pid)
        cost_mb = (after - before) / 1024
        print(f"200 idle watchers: RSS {before / 1024:.1f} -> {after / 1024:.1f} MB "
              f"(+{cost_mb:.2f} MB)")
        assert cost_mb < 20, cost_mb
    finally:
        for s in socks:
            s.close()
        warm.close()
    wait_for(lambda: c1.get("/api/dht/stats")[1]["dashboard"]["watch"]["watchers"] == 0,
             10, 0.2, "watchers released after the clients closed")


def test_bad_watch_requests_are_4xx_json(cluster):
    _cl, c1, _w0 = cluster
    for path, status in (("/api/services/ocr!/watch", 400),
                         ("/api/services/ocr/watch?x=1", 400)):
        code, body = c1.get(path)
        assert code == status and "error" in body, (path, code, body)


def test_lookup_explain_cli_prints_parts_and_exclusions(cluster):
    _cl, c1, _w0 = cluster
    res = subprocess.run(agent_cmd("lookup", "OCR", "--explain", "--region", "elsewhere",
                                   "--url", c1.url), env=agent_env(), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "ocr: 0 workers offered" in res.stdout
    assert "w0" in res.stdout and "region filter: test is not elsewhere" in res.stdout
    res = subprocess.run(agent_cmd("lookup", "ocr", "--explain", "--json", "--url", c1.url),
                         env=agent_env(), capture_output=True, text=True, timeout=30)
    body = json.loads(res.stdout)
    (w,) = [w for w in body["workers"] if w["name"] == "w0"]
    parts = w["components"]
    total = parts["load"] + parts["gpu"]
    for k in ("region", "latency", "age", "health"):
        total = total + parts[k]
    assert total == w["score"] and parts["region"] == 0.4      # c1 and w0 share "test"
