"""A hostile worker against a caller's router, with real agent processes (issue 20 item 2):

``whang`` announces ``evil`` with a large capacity and its upstream never answers. Many
callers route to it at once: the caller agent holds at most its share of connections to
it (counted from the caller's own sockets), the rest get a 503 at once, routes to the
healthy ``w1`` keep working, ``whang`` is backed off while its requests still hang, and
when the callers hang up every held request is dropped at the upstream too.

Also: an upstream that does the work and then answers ``503`` + ``RMA-Not-Processed: 1``
does not get a POST sent to a second worker (the gateway drops that header from what an
upstream answers: only the gateway itself may say it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.router.slots import SHARE
from tests.cluster import Cluster, Node, wait_until
from tests.router.test_cluster_route import _gateway, request
from tests.router.upstreams import Upstreams

pytestmark = pytest.mark.slow

CALLERS = 150


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Upstreams]]:
    tmp = tmp_path_factory.mktemp("hostile")
    ups = Upstreams()
    with Cluster(tmp, record_ttl=30, republish=3) as cl:
        c1 = cl.coordinator("c1")
        _gateway(c1, None, [])
        cl.start(c1)
        cl.wait_ready(c1)
        w1 = cl.worker("w1", seeds=[c1.dht_addr])
        _gateway(w1, ups.add("w1", w1.ip), ["ocr"])
        whang = cl.worker("whang", seeds=[c1.dht_addr])
        _gateway(whang, ups.add("whang", whang.ip), ["evil"], max_concurrency=1000)
        liars = [cl.worker(n, seeds=[c1.dht_addr]) for n in ("wl1", "wl2")]
        for w in liars:
            _gateway(w, ups.add(w.name, w.ip), ["lie"])
        cl.start(w1, whang, *liars)
        cl.wait_ready(w1, whang, *liars)
        wait_until(lambda: c1.providers("evil")[0] == {"whang"}, 30, "whang announced")
        wait_until(lambda: c1.providers("ocr")[0] == {"w1"}, 30, "w1 announced")
        wait_until(lambda: c1.providers("lie")[0] == {"wl1", "wl2"}, 30, "liars announced")
        try:
            yield cl, ups
        finally:
            ups.close()


def connections_to(node: Node, ip: str, port: int) -> int:
    """Established TCP connections the node's process holds to ``ip:port`` (its own
    sockets, read from /proc: the state, not a counter the agent keeps)."""
    assert node.proc is not None
    pid = node.proc.pid
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    n = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[2] == want and f[3] == "01" and f[9] in inodes:
            n += 1
    return n


class Callers:
    """``n`` raw HTTP callers of ``path`` on a background loop; they hold their
    connection until :meth:`hang_up` (or until answered)."""

    def __init__(self, node: Node, path: str, n: int) -> None:
        self.node, self.path, self.n = node, path, n
        self.answers: Counter[int] = Counter()
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> list[asyncio.Task[None]]:
        return [self.loop.create_task(self._one(i)) for i in range(self.n)]

    async def _one(self, i: int) -> None:
        reader, writer = await asyncio.open_connection(self.node.ip, self.node.http_port)
        self.writers.append(writer)
        writer.write(f"GET {self.path}?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:"))
        self.bodies.append(await reader.readexactly(length))
        self.answers[status] += 1

    def answered(self) -> int:
        return sum(self.answers.values())

    def hang_up(self) -> None:
        async def close() -> None:
            for t in self.tasks:
                t.cancel()
            for w in self.writers:
                w.close()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_hanging_worker_costs_callers_its_share_only(net: tuple[Cluster,
                                                                  Upstreams]) -> None:
    cl, ups = net
    c1, whang = cl.nodes["c1"], cl.nodes["whang"]
    gw_ip, gw_port = whang.data["gateway"]["listen"].split(":")
    callers = Callers(c1, "/route/evil/hang", CALLERS)
    try:
        # the share reaches the upstream and stays there; everyone else is answered
        wait_until(lambda: ups.open.get("whang", 0) == SHARE, 30, "the share held")
        wait_until(lambda: callers.answered() == CALLERS - SHARE, 30, "the rest answered")
        assert callers.answers[503] == CALLERS - SHARE, callers.answers
        assert all(b"share of the router's connections" in b for b in callers.bodies)
        assert connections_to(c1, gw_ip, int(gw_port)) <= SHARE
        # a healthy worker is routed to as before
        for i in range(20):
            status, _, raw = request(c1, "GET", f"/route/ocr/echo/{i}", timeout=10)
            assert status == 200, raw[:300]
        # backed off while its requests still hang: no new request goes there
        wait_until(lambda: c1.get("/api/dht/stats")[1]["router_detail"]["workers"]
                   ["suspects"] >= 1, 30, "whang reported as hanging")
        status, _, raw = request(c1, "GET", "/route/evil/hang?after", timeout=10)
        assert status == 404, raw[:300]
        assert connections_to(c1, gw_ip, int(gw_port)) <= SHARE
        assert ups.open["whang"] == SHARE
        detail = c1.get("/api/dht/stats")[1]["router_detail"]
        assert detail["workers"]["max_in_flight_per_worker"] == SHARE
        assert detail["outcomes"]["shed"] == CALLERS - SHARE
    finally:
        callers.hang_up()
    # the callers hung up: the router dropped each request, the gateway its upstream's
    wait_until(lambda: ups.open.get("whang", 0) == 0, 30, "held requests dropped upstream")
    assert ups.gone["whang"] == SHARE
    wait_until(lambda: c1.get("/api/dht/stats")[1]["router_detail"]["workers"]
               ["workers_in_flight"] == 0, 30, "the router's slots freed")
    wait_until(lambda: connections_to(c1, gw_ip, int(gw_port)) == 0, 30, "sockets closed")


def test_an_upstream_cannot_get_a_processed_post_sent_twice(net: tuple[Cluster,
                                                                       Upstreams]) -> None:
    cl, ups = net
    c1 = cl.nodes["c1"]
    status, hdrs, raw = request(c1, "POST", "/route/lie/lie", b"charge 1 EUR")
    assert status == 503, raw[:300]
    assert json.loads(raw)["processed"] is True
    assert hdrs["rma-attempts"] == "1" and "rma-not-processed" not in hdrs
    # one POST, one execution: it was not sent on to the other worker
    assert ups.hits.get("wl1", 0) + ups.hits.get("wl2", 0) == 1
