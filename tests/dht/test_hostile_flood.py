"""Flooding real agents: 1,000 fake workers from one host, and a ``reachable`` flood.

Real agent processes (``tests.cluster``) under ``RMA_AGENT_DHT_LOOPBACK=strict``, each on
its own /24 of loopback (so a loopback IP counts as one host, as a real address would).
The attacker is a real DHT node in the test process, on one more address.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import msgpack
import pytest

from agent.dht.diversity import LOOPBACK_ENV
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.dht.server import DHTNode
from tests.cluster import Cluster, wait_until
from tests.dht.hostile import free_net
from tests.util import run_uvloop

pytestmark = pytest.mark.slow

FAKES = 1000
PER_HOST = 64            # ProviderStorage.max_per_sender (per IP)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _flood(ip: str, seed: tuple[str, int]) -> dict[str, int]:
    """A real node on ``ip`` announces FAKES fresh-keyed "H200, load 0" ocr workers."""
    node = DHTNode(Identity.generate(), mode="client")   # stores nothing itself
    await node.listen(0, ip)
    try:
        assert await node.bootstrap([seed]) > 0
        stored = 0
        idents = [Identity.generate() for _ in range(FAKES)]
        for i in range(0, FAKES, 50):
            recs = [WorkerRecord.create(x, name=f"fake{i + j}", services=["ocr"],
                                        endpoint=f"https://fake{i + j}.example", gpu="H200",
                                        gpu_memory_gb=141, load=0.0, capacity=8, region="test",
                                        ttl=3600)
                    for j, x in enumerate(idents[i:i + 50])]
            stored += sum(await asyncio.gather(*(node.announce(r) for r in recs)))
        return {"stores_accepted": stored, "announces": FAKES}
    finally:
        node.stop()


def test_thousand_fake_workers_from_one_host(tmp_path, monkeypatch):
    monkeypatch.setenv(LOOPBACK_ENV, "strict")
    net = free_net()
    with Cluster(tmp_path, record_ttl=60, republish=5) as cl:
        c1 = cl.coordinator("c1", ip=f"127.{net}.1.1")
        cl.start(c1)
        cl.wait_ready(c1)
        workers = [cl.worker(f"w{i}", seeds=[c1.dht_addr], ip=f"127.{net}.{i + 2}.1",
                             mode="server") for i in range(4)]
        cl.start(*workers)
        cl.wait_ready(*workers)
        agents = [c1, *workers]
        honest = {w.name for w in workers}
        wait_until(lambda: all(honest <= a.providers("ocr")[0] for a in agents), 30,
                   "every agent finds the honest workers")
        rss_before = {a.name: rss_kib(a.proc.pid) for a in agents}

        t0 = time.monotonic()
        figures = run_uvloop(_flood(f"127.{net}.66.1", (c1.ip, c1.udp_port)))
        figures["seconds"] = round(time.monotonic() - t0, 1)

        per_agent = {}
        for a in agents:
            status, st = a.get("/api/dht/stats")
            assert status == 200
            names, _ms, _rtt = a.providers("ocr")
            fakes = sum(1 for n in names if n.startswith("fake"))
            per_agent[a.name] = {"records": st["records_stored"],
                                 "sender_full": st["store_refused"].get("sender_full", 0),
                                 "found_honest": len(honest & names), "found_fake": fakes,
                                 "rss_growth_kib": rss_kib(a.proc.pid) - rss_before[a.name]}
        print(figures, per_agent)
        for name, f in per_agent.items():
            # the attacker's host holds at most its quota on every node (+ the honest
            # workers' records under ocr and ALL_SERVICES)
            assert f["records"] <= PER_HOST + 2 * len(honest) + 2, (name, f)
            assert f["sender_full"] > 0, (name, f)
            assert f["found_honest"] == len(honest), (name, f)
            assert f["rss_growth_kib"] < 30_000, (name, f)
        status, metrics = c1.get("/metrics")
        assert status == 200
        challenged = re.search(r"^rma_agent_dht_token_challenges_total ([0-9.e+]+)$", metrics,
                               re.M)
        assert challenged and float(challenged.group(1)) > 0, metrics[:400]
        assert re.search(r"^rma_agent_dht_diversity_refused_total ", metrics, re.M)
        assert re.search(r"^rma_agent_dht_records_evicted_total ", metrics, re.M)
        # 2 keys (ocr, ALL_SERVICES) x 1000 announces: at most the quota per storing node
        assert figures["stores_accepted"] <= len(agents) * PER_HOST, figures


class _ReachAsker(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: list[object] = []

    def datagram_received(self, data: bytes, addr) -> None:
        if data[:1] == b"\x01":
            self.answers.append(msgpack.unpackb(data[21:], raw=False))


async def _reachable_flood(ip: str, seed: tuple[str, int], seconds: float) -> list[object]:
    """50 ``reachable`` requests a second from one IP (fresh source port each, as a real
    asker's probe uses), each asking for a ping to a port nobody listens on."""
    loop = asyncio.get_running_loop()
    tr, asker = await loop.create_datagram_endpoint(_ReachAsker, local_addr=(ip, 0))
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((ip, 0))
                dead_port = s.getsockname()[1]
            tr.sendto(b"\x00" + os.urandom(20) + msgpack.packb(
                ["reachable", [b"", dead_port]], use_bin_type=True), seed)
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)
        return asker.answers
    finally:
        tr.close()


def test_reachable_flood_from_one_source_does_not_decide_for_others(tmp_path, monkeypatch):
    monkeypatch.setenv(LOOPBACK_ENV, "strict")
    net = free_net()
    with Cluster(tmp_path, record_ttl=60, republish=5) as cl:
        c1 = cl.coordinator("c1", ip=f"127.{net}.1.1")
        cl.start(c1)
        cl.wait_ready(c1)
        newcomer = cl.worker("new", seeds=[c1.dht_addr], ip=f"127.{net}.2.1", mode="auto")

        async def flood_while_joining() -> list[object]:
            flood = asyncio.ensure_future(
                _reachable_flood(f"127.{net}.66.1", (c1.ip, c1.udp_port), 8.0))
            await asyncio.sleep(1.0)          # the coordinator's global budget is spent
            cl.start(newcomer)
            return await flood

        answers = run_uvloop(flood_while_joining())
        cl.wait_ready(newcomer)
        status, st = newcomer.get("/api/dht/stats")
        _s, cst = c1.get("/api/dht/stats")
        print(len(answers), answers.count(None), answers.count(False), st["mode"],
              cst["drops"])
        assert len(answers) >= 300                        # ~50/s for 8 s, all answered
        assert answers.count(None) >= len(answers) - 10   # "no capacity", not a verdict
        assert cst["drops"].get("reachable_source_limited", 0) >= 300
        assert status == 200 and st["mode"] == "server", st
        assert "mode auto -> server" in newcomer.log_text()
