"""The router end to end with real agent processes and real upstream HTTP services:

caller agent (``/route/``) -> worker agent's gateway -> upstream, for every method, with
query strings and binary bodies; 100 MB each way with SHA-256 match and flat RSS; event
streams arrive as written; hop-by-hop headers never cross; a full worker's request lands
on another; a worker announcing another's endpoint is never routed to; a record with an
``http://10.0.0.1/`` endpoint is never contacted; a worker SIGKILLed during a burst of 300
GETs loses none.

One network for the module (the tests run in file order; the SIGKILL test is last):
coordinator ``c1`` is the caller; ``w1``-``w3`` serve ``ocr`` (each its own upstream);
``wfull`` (``max_concurrency = 1``) and ``w2`` serve ``busy``; ``wimp`` announces w1's
endpoint with its own key; ``wlan`` announces ``http://10.0.0.1/``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, Node, wait_until
from tests.router.upstreams import MB, Upstreams, download_sha256
from tests.util import agent_cmd, agent_env, free_port

pytestmark = pytest.mark.slow

BIG_MB = 100


def _gateway(node: Node, upstream: str | None, services: list[str],
             endpoint: str | None = None, **worker: Any) -> None:
    port = free_port(socket.SOCK_STREAM, node.ip)
    node.data["gateway"] = {"listen": f"{node.ip}:{port}", "max_body_mb": 2 * BIG_MB,
                            "upstream_timeout": 20}
    if upstream:
        node.data["gateway"]["upstreams"] = {s: upstream for s in services}
    if node.role == "worker":
        node.data["worker"].update({"services": services,
                                    "endpoint": endpoint or f"http://{node.ip}:{port}",
                                    **worker})
    node.write_config()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Upstreams]]:
    tmp = tmp_path_factory.mktemp("route")
    ups = Upstreams()
    with Cluster(tmp, record_ttl=30, republish=3) as cl:
        c1 = cl.coordinator("c1")
        _gateway(c1, None, [])
        cl.start(c1)
        cl.wait_ready(c1)
        seeds = [c1.dht_addr]
        for name in ("w1", "w2", "w3"):
            w = cl.worker(name, seeds=seeds)
            _gateway(w, ups.add(name, w.ip), ["ocr", "busy"] if name == "w2" else ["ocr"])
        wfull = cl.worker("wfull", seeds=seeds)
        _gateway(wfull, ups.add("wfull", wfull.ip), ["busy"], max_concurrency=1)
        w1 = cl.nodes["w1"]
        wimp = cl.worker("wimp", seeds=seeds)
        _gateway(wimp, ups.add("wimp", wimp.ip), ["ocr"],
                 endpoint=w1.data["worker"]["endpoint"])
        wlan = cl.worker("wlan", seeds=seeds)
        _gateway(wlan, ups.add("wlan", wlan.ip), ["ocr"], endpoint="http://10.0.0.1/")
        workers = [cl.nodes[n] for n in ("w1", "w2", "w3", "wfull", "wimp", "wlan")]
        cl.start(*workers)
        cl.wait_ready(*workers)
        names = {"w1", "w2", "w3", "wimp", "wlan"}
        wait_until(lambda: c1.providers("ocr")[0] >= names, 30, "every ocr worker announced")
        wait_until(lambda: c1.providers("busy")[0] >= {"w2", "wfull"}, 30, "busy workers")
        try:
            yield cl, ups
        finally:
            ups.close()


def ids(cl: Cluster) -> dict[str, str]:
    """Worker name -> id (hex)."""
    return {n.name: n.node_id() for n in cl.nodes.values() if n.role == "worker" and n.alive()}


def request(node: Node, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None,
            timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(node.ip, node.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def rss_kb(node: Node, field: str = "VmRSS") -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


# ---------------------------------------------------------------------------- tests
def test_every_method_with_query_and_binary_body(net: tuple[Cluster, Upstreams]) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    wid = ids(cl)
    honest = {wid["w1"], wid["w2"], wid["w3"]}
    seen = set()
    for i, method in enumerate(("GET", "POST", "PUT", "DELETE") * 3):
        body = os.urandom(70_000 + i) if method in ("POST", "PUT") else None
        status, hdrs, raw = request(c1, method, f"/route/ocr/echo/a%20b/{i}?x={i}&y=a%26b",
                                    body, {"X-Trace": f"t{i}",
                                           "Content-Type": "application/octet-stream"})
        assert status == 200, raw[:300]
        answer = json.loads(raw)
        assert answer["method"] == method
        assert answer["path"] == f"/echo/a b/{i}"
        assert answer["query"] == f"x={i}&y=a%26b"
        assert answer["headers"]["x-trace"] == f"t{i}"
        assert answer["size"] == (len(body) if body else 0)
        if body:
            assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        assert hdrs["rma-worker"] in honest, (hdrs, wid)
        assert wid[answer["served_by"]] == hdrs["rma-worker"]   # the header tells the truth
        assert int(hdrs["rma-attempts"]) >= 1
        seen.add(hdrs["rma-worker"])
    # the router picks by cost (agent/router/policy.py): one at a time, the cheapest worker
    # may take all twelve; the spread under concurrent callers is test_select_cluster's
    assert seen <= set(honest), seen


def test_100mb_up_and_down_sha256_and_flat_rss(net: tuple[Cluster, Upstreams]) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    watched = [c1] + [cl.nodes[n] for n in ("w1", "w2", "w3")]
    before = {n.name: rss_kb(n) for n in watched}
    # upload: 100 MiB streamed from this process, never held whole anywhere
    h = hashlib.sha256()
    conn = http.client.HTTPConnection(c1.ip, c1.http_port, timeout=120)
    conn.putrequest("POST", "/route/ocr/upload")
    conn.putheader("Content-Length", str(BIG_MB * MB))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    for i in range(BIG_MB):
        chunk = hashlib.sha512(i.to_bytes(4, "big")).digest() * (MB // 64)
        h.update(chunk)
        conn.send(chunk)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, answer
    assert answer["size"] == BIG_MB * MB and answer["sha256"] == h.hexdigest()
    # download: 100 MiB, hashed as it arrives
    conn = http.client.HTTPConnection(c1.ip, c1.http_port, timeout=120)
    conn.request("GET", f"/route/ocr/download?mb={BIG_MB}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("RMA-Worker")
    h = hashlib.sha256()
    size = 0
    while chunk := resp.read(MB):
        h.update(chunk)
        size += len(chunk)
    conn.close()
    assert size == BIG_MB * MB and h.hexdigest() == download_sha256(BIG_MB)
    # peak RSS (VmHWM) of the caller and the workers stayed well below one body's size
    for n in watched:
        grew = rss_kb(n, "VmHWM") - before[n.name]
        assert grew < 40 * 1024, f"{n.name}: peak RSS grew {grew / 1024:.0f} MiB"


def test_event_stream_arrives_as_written(net: tuple[Cluster, Upstreams]) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    conn = http.client.HTTPConnection(c1.ip, c1.http_port, timeout=30)
    conn.request("GET", "/route/ocr/events?n=4&gap=0.6")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith(
        "text/event-stream")
    lags = []
    buf = b""
    while len(lags) < 4:
        chunk = resp.read1(4096)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            written = float(event.split()[-1])
            lags.append(time.time() - written)
    conn.close()
    assert len(lags) == 4
    # each event arrives as soon as it is written, not when the answer ends (~1.8 s later)
    assert max(lags) < 0.4, lags


def test_hop_by_hop_headers_never_cross(net: tuple[Cluster, Upstreams]) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    # request side, sent raw so no client library edits the headers
    with socket.create_connection((c1.ip, c1.http_port), timeout=10) as s:
        s.sendall(b"GET /route/ocr/echo/hop HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
                  b"Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
                  b"Proxy-Authorization: Basic eDp5\r\nX-End-To-End: yes\r\n"
                  b"RMA-Region: test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    got = json.loads(rest[:length])["headers"]
    assert got["x-end-to-end"] == "yes"
    for hop in ("x-secret-hop", "keep-alive", "te", "upgrade", "proxy-authorization",
                "rma-region"):
        assert hop not in got, (hop, got)
    # response side: the upstream's hop-by-hop headers stop at the gateway or the router
    status, hdrs, _ = request(c1, "GET", "/route/ocr/hop")
    assert status == 200 and hdrs["x-end-to-end"] == "crosses"
    for hop in ("x-hop-named", "keep-alive", "proxy-authenticate"):
        assert hop not in hdrs, (hop, hdrs)


def test_full_worker_answer_lands_on_another(net: tuple[Cluster, Upstreams]) -> None:
    cl, ups = net
    c1 = cl.nodes["c1"]
    wid = ids(cl)
    # occupy wfull's one slot straight through its gateway: the slot is taken once the
    # request reached wfull's upstream (the gateway counts it in flight before forwarding)
    gw = cl.nodes["wfull"].data["worker"]["endpoint"]
    host, port = gw.removeprefix("http://").split(":")
    before = ups.hits.get("wfull", 0)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/busy/slow?s=6")
    wait_until(lambda: ups.hits.get("wfull", 0) > before, 10, "wfull's slot taken")
    attempts: Counter[str] = Counter()
    try:
        for i in range(12):
            status, hdrs, raw = request(c1, "POST", f"/route/busy/echo/{i}", b"work")
            assert status == 200, raw[:300]
            assert hdrs["rma-worker"] == wid["w2"], "a full worker cannot have served it"
            attempts[hdrs["rma-attempts"]] += 1
    finally:
        conn.getresponse().read()
        conn.close()
    # the selection policy (agent/router/policy.py) tries wfull only while it does not
    # know it is full; each such try was refused (503 + RMA-Not-Processed, Retry-After
    # honoured) and retried on w2; none reached wfull's upstream
    assert sum(attempts.values()) == 12 and set(attempts) <= {"1", "2"}, attempts
    assert ups.hits.get("wfull", 0) == before + 1
    status, stats = c1.get("/api/dht/stats")
    assert stats["router_detail"]["retries_by_reason"]["not_processed"] >= attempts["2"]


def test_impostor_and_forbidden_endpoint_never_routed_to(net: tuple[Cluster,
                                                                    Upstreams]) -> None:
    cl, ups = net
    c1 = cl.nodes["c1"]
    wid = ids(cl)
    lan_hits = ups.hits.get("wlan", 0)
    served = Counter()
    for i in range(40):
        status, hdrs, raw = request(c1, "GET", f"/route/ocr/echo/{i}")
        assert status == 200, raw[:300]
        served[hdrs["rma-worker"]] += 1
    assert wid["wimp"] not in served and wid["wlan"] not in served
    # the impostor failed its proof: held out of answers, and said so in stats
    status, body = c1.get("/api/services/ocr")
    listed = {w["name"] for w in body["workers"]}
    assert "wimp" not in listed and "wlan" not in listed and {"w1", "w2", "w3"} <= listed
    status, stats = c1.get("/api/dht/stats")
    assert stats["discovery"]["proof_failed_workers"] >= 1
    # explain says why each was left out
    status, body = c1.get("/api/services/ocr?explain=1")
    why = {e["name"]: e for e in body["excluded"]}
    assert why["wimp"]["state"] == "proof failed", why.get("wimp")
    assert "ownership proof failed" in why["wimp"]["reason"]
    assert "never contacted" in why["wlan"]["reason"], why.get("wlan")
    # never contacted: not one connection to 10.0.0.1 was even asked for
    assert "10.0.0.1" not in stats["router_detail"]["contacted_hosts"]
    assert any(h.startswith("127.") for h in stats["router_detail"]["contacted_hosts"])
    assert ups.hits.get("wlan", 0) == lan_hits


def test_cli_call_prints_the_answer_and_who_served(net: tuple[Cluster, Upstreams],
                                                   tmp_path: Path) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    wid = ids(cl)
    data = os.urandom(200_000)
    (tmp_path / "in.bin").write_bytes(data)
    res = subprocess.run(agent_cmd("call", "OCR", "echo/cli?q=1", "--data",
                                   f"@{tmp_path / 'in.bin'}", "--header", "X-Cli: yes",
                                   "--url", c1.url), capture_output=True, timeout=60,
                         env=agent_env())
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["method"] == "POST" and answer["path"] == "/echo/cli"
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    assert answer["headers"]["x-cli"] == "yes"
    line = res.stderr.decode().strip()
    assert line.startswith("ocr: HTTP 200 from worker ") and "(1 attempt" in line, line
    assert line.split()[5] == wid[answer["served_by"]]
    # nobody serves it: the router's 404 -> exit 1; a bad name or header -> exit 2
    res = subprocess.run(agent_cmd("call", "nobody", "/x", "--url", c1.url),
                         capture_output=True, timeout=60, env=agent_env())
    assert res.returncode == 1 and b"no workers serve" in res.stdout, res
    for bad in (["bad name!", "/x"], ["ocr", "/x", "--header", "NoColon"],
                ["ocr", "/x", "--data", "@/nonexistent/file"]):
        res = subprocess.run(agent_cmd("call", *bad, "--url", c1.url), capture_output=True,
                             timeout=60, env=agent_env())
        assert res.returncode == 2, (bad, res)
    # the agent is not there: exit 1
    res = subprocess.run(agent_cmd("call", "ocr", "/x", "--url",
                                   f"http://127.0.0.1:{free_port()}"),
                         capture_output=True, timeout=60, env=agent_env())
    assert res.returncode == 1 and b"cannot reach the agent" in res.stderr, res


def test_sigkill_during_300_gets_loses_none(net: tuple[Cluster, Upstreams]) -> None:
    cl, _ = net
    c1 = cl.nodes["c1"]
    by_id = {v: cl.nodes[k] for k, v in ids(cl).items()}
    killed: list[Node] = []
    results: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    retries_before = c1.get("/api/dht/stats")[1]["router"]["retries"]

    def one(i: int) -> None:
        status, hdrs, _ = request(c1, "GET", f"/route/ocr/echo/burst/{i}", timeout=30)
        with lock:
            results.append((status, hdrs.get("rma-worker", ""), hdrs.get("rma-attempts", "")))
            if len(results) == 100:
                # the worker that just served: the one the router is sending to now (the
                # selection policy may well be leaving a slower one alone)
                killed.append(by_id[results[-1][1]])
                cl.kill(killed[0], signal.SIGKILL)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(300)))
    victim = killed[0]
    assert not victim.alive()
    statuses = Counter(r[0] for r in results)
    assert statuses == {200: 300}, statuses        # none hung (30 s each) or failed
    # the kill mattered: requests that met the dead worker were tried again elsewhere
    assert c1.get("/api/dht/stats")[1]["router"]["retries"] > retries_before
    assert {r[1] for r in results[150:]} - {""} <= set(ids(cl).values())
