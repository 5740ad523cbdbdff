"""``GET /api/services/{name}/watch`` against real agent processes (tests/cluster.py),
and the hub's bound, heartbeat and local-withdrawal path in process.

One cluster for the module: a coordinator and a client-mode worker ``w0`` (a DHT client
stores no records, so a watch there can only learn changes from its periodic DHT
refresh). A second worker ``w1`` starts, changes its load and stops while we watch.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.cluster import http as http_call
from tests.sse import SSEReader
from tests.util import agent_cmd, agent_env, wait_for, wait_for_async

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


async def _read_until(resp: Any, needle: bytes) -> bytes:
    buf = b""
    while needle not in buf:
        chunk = await asyncio.wait_for(resp.content.readany(), 5)
        assert chunk, buf
        buf += chunk
    return buf


async def test_hub_bound_heartbeat_and_local_withdrawal():
    """In process (a stub DHT): the watcher bound answers 503 JSON, a quiet stream gets
    heartbeats, and a tombstone stored locally removes the worker at once."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from agent.dht.identity import Identity
    from agent.discovery.watch import WatchHub
    from tests.discovery._support import make_discovery, make_record

    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    ident = Identity.generate()
    rec = make_record(ident, name="wa")
    dht.add(rec)
    hub = WatchHub(agent, max_watchers=2, refresh_s=30.0, heartbeat_s=0.3)
    app = web.Application()
    app.router.add_get("/api/services/{name}/watch", hub.handle)
    await comp.start()
    hub.start()
    try:
        async with TestClient(TestServer(app)) as client:
            r1 = await client.get("/api/services/OCR/watch")     # names are lowercased
            assert r1.status == 200
            assert b'"name":"wa"' in await _read_until(r1, b"event: snapshot")
            r2 = await client.get("/api/services/ocr/watch")
            r3 = await client.get("/api/services/ocr/watch")
            assert r3.status == 503 and r3.headers["Retry-After"]
            assert "too many watchers" in (await r3.json())["error"]
            await _read_until(r1, b": ping")
            agent.emit("record", rec.tombstone(ident))           # stored by the local node
            got = await _read_until(r2, b"event: removed")
            assert b'"reason":"withdrawn"' in got.split(b"event: removed", 1)[1]
            r1.close()
            r2.close()
    finally:
        await hub.stop()
        await comp.stop()


async def test_a_watcher_that_stops_reading_is_dropped():
    """A real socket that never reads, on a watch (in process): its bounded queue fills,
    the hub drops it and gives its slot back; other watchers are not held up."""
    from aiohttp.test_utils import TestServer

    from agent.discovery.watch import WatchHub
    from tests.discovery._support import make_discovery, make_record

    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    dht.add(make_record(name="wa"))
    hub = WatchHub(agent, max_watchers=4, refresh_s=30.0, queue_size=16)
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/api/services/{name}/watch", hub.handle)
    server = TestServer(app)
    await server.start_server()
    await comp.start()
    hub.start()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (server.host, server.port))
        await loop.sock_sendall(sock, b"GET /api/services/ocr/watch HTTP/1.1\r\nHost: x\r\n\r\n")
        w = await wait_for_async(
            lambda: hub.limit.current == 1 and (w := hub.get("ocr")) is not None
            and w.channel.subscribers and w, what="the raw socket subscribed to the watch")
        assert len(w.channel.subscribers) == 1
        view = {"name": "x" * 3000}
        for i in range(4000):                     # ~12 MB offered to a reader reading nothing
            w.channel.publish("changed", {"service": "ocr", "worker": {**view, "n": i}})
            if hub.limit.dropped:
                break
            if i % 20 == 0:
                await asyncio.sleep(0)
        assert hub.limit.dropped == 1
        await wait_for_async(lambda: hub.limit.current == 0, what="the dropped slot returned")
        assert w.watchers == 0 and not w.channel.subscribers
    finally:
        sock.close()
        await hub.stop()
        await comp.stop()
        await server.close()


def test_membership_judges_staleness_by_each_records_own_refresh():
    """A worker that republishes every 60 s stays a member at 30 s of age even when the
    watching agent's own republish interval is 10 s (lookups offer it: it carries its
    own ``refresh``); before, the watch reported it "removed (stale)" and "added" again
    every refresh. A 10 s worker silent for 30 s is removed as stale."""
    from agent.discovery.select import CandidateSet
    from agent.discovery.watch import ServiceWatch, WatchHub
    from tests.discovery._support import make_discovery, make_record

    agent, comp, _dht = make_discovery(republish=10)
    hub = WatchHub(agent)
    w = ServiceWatch(hub, "ocr")
    now = time.time()
    slow = make_record(name="slow", refresh=60.0, now=now - 30)
    quick = make_record(name="quick", refresh=10.0, now=now - 15)
    kinds: list[tuple[str, str, str]] = []
    hub.on_change = lambda svc, kind, view, reason: kinds.append((kind, view["name"], reason))
    w.apply(CandidateSet("ocr", [slow, quick], comp.scorer, now, comp.max_age_s), now)
    assert sorted(v["name"] for v in w.members.values()) == ["quick", "slow"]
    later = now + 10             # quick: 25 s > 2 x 10 s; slow: 40 s <= 2 x 60 s
    w.apply(CandidateSet("ocr", [slow, quick], comp.scorer, now, comp.max_age_s), later)
    assert sorted(v["name"] for v in w.members.values()) == ["slow"]
    assert kinds == [("added", "slow", ""), ("added", "quick", ""),
                     ("removed", "quick", "stale")], kinds


async def test_the_all_workers_watch_is_a_paced_index_crawl(monkeypatch):
    """``"*"`` reads every service-index shard with all its records: the dashboard's
    1 s pace made one open page cost ~160 find_providers RPCs/s in a 6-node demo. It is
    refreshed every INDEX_REFRESH_S, woken by a join at most every INDEX_MIN_GAP_S, and
    not woken by a known worker's refresh; per-service watches keep their pace."""
    from agent.discovery import watch as watch_mod
    from agent.discovery.watch import WatchHub
    from tests.discovery._support import make_discovery, make_record

    monkeypatch.setattr(watch_mod, "INDEX_REFRESH_S", 60.0, raising=False)
    monkeypatch.setattr(watch_mod, "INDEX_MIN_GAP_S", 0.3, raising=False)
    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    from agent.dht.identity import Identity

    ident = Identity.generate()
    known = make_record(ident, name="known")
    dht.add(known)
    hub = WatchHub(agent, refresh_s=0.05)
    await comp.start()
    hub.start()
    try:
        star, ocr = hub.pin("*"), hub.pin("ocr")
        assert star is not None and ocr is not None
        await star.wait_first()
        # ocr's own refreshes are the clock: 20 of them at its 0.05 s pace span well over
        # the "*" watch's 0.3 s gap, and the index was crawled once all that time
        await wait_for_async(lambda: ocr.refreshes >= 20, what="20 paced ocr refreshes")
        assert star.refreshes == 1, (star.refreshes, ocr.refreshes)
        assert list(star.members) == [known.worker_id]
        agent.emit("record", make_record(ident, name="known"))     # its next refresh
        assert not star.wake.is_set()            # a known worker's refresh: no crawl
        assert ocr.wake.is_set()                 # (its service's watch does look)
        joiner = make_record(name="joiner")
        dht.add(joiner)
        agent.emit("record", joiner)
        assert star.wake.is_set()                # a join wakes the crawl
        await wait_for_async(lambda: joiner.worker_id in star.members,
                             what="the joiner in the '*' watch")
        assert star.refreshes == 2
    finally:
        await hub.stop()
        await comp.stop()
