"""Coordinator fallback: when the DHT cannot answer, registries are asked over real HTTP
and every record is verified here."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import time

import pytest
from aiohttp import web

from agent.dht.identity import Identity
from agent.proof import PROOF_PATH, make_proof, parse_nonce
from tests.cluster import Cluster
from tests.discovery._support import make_discovery, make_record
from tests.util import free_port


class Registry:
    """A real HTTP server speaking the coordinator's ``GET /api/registry/{service}``."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.hits = 0
        self.mode = "ok"           # "ok" | "500" | "garbage" | "slow"
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.identity = Identity.generate()
        self.stopping = asyncio.Event()     # "slow" answers only then: after any caller gave up

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "garbage":
            return web.Response(body=b"\x00not json")
        if self.mode == "slow":
            await self.stopping.wait()
        svc = request.match_info["service"]
        recs = [b for b in self.records if svc == "*" or svc in _services(b)]
        return web.json_response({"service": svc,
                                  "records": [base64.b64encode(b).decode() for b in recs]})

    async def proof(self, request: web.Request) -> web.Response:
        nonce = parse_nonce(request.query.get("nonce", ""))
        return web.json_response(make_proof(self.identity, nonce, self.url))

    async def __aenter__(self) -> Registry:
        app = web.Application()
        app.router.add_get("/api/registry/{service}", self.handler)
        # records of ``self.identity`` point here: discovery's probes (ownership proofs)
        # succeed for them
        app.router.add_get(PROOF_PATH, self.proof)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        self.stopping.set()
        await self.runner.cleanup()




def _services(raw: bytes) -> tuple[str, ...]:
    """Services of an encoded record; junk is served to everyone (clients must cope)."""
    from agent.dht.record import RecordError, WorkerRecord
    try:
        return WorkerRecord.decode(raw).services
    except RecordError:
        return ("ocr", "tts")


@pytest.mark.parametrize("dht_state", ["absent", "empty", "failing", "timeout"])
async def test_dht_unusable_answers_from_coordinator(dht_state):
    async with Registry() as reg:
        for i in range(3):
            reg.records.append(make_record(name=f"w{i}", load=float(i),
                                           endpoint=reg.url).encode())
        _agent, comp, dht = make_discovery(with_dht=dht_state != "absent",
                                          coordinators=[reg.url])
        if dht_state == "failing":
            dht.fail = True
        elif dht_state == "timeout":
            dht.delay = 5.0
            comp.dht_timeout_s = 0.2
        await comp.start()
        try:
            res = await comp.lookup("ocr")
            assert res.source == "coordinator"
            # a DHT that does not answer is given up after dht_timeout_s (counted), not
            # waited for (its 5 s); how fast the fallback is, bench/ measures
            assert comp.stats()["discovery"]["dht_timeouts"] == (dht_state == "timeout")
            if dht is not None:
                assert dht.calls == ["ocr"] and dht.cancelled == (dht_state == "timeout")
            assert sorted(w["name"] for w in res.workers) == ["w0", "w1", "w2"]
            again = await comp.lookup("ocr")
            assert again.source == "cache" and reg.hits == 1
            assert comp.stats()["discovery"]["fallbacks"] == 1
        finally:
            await comp.stop()


async def test_forged_altered_and_expired_records_are_refused():
    async with Registry() as reg:
        ident = Identity.generate()
        good = make_record(name="good", endpoint=reg.url)
        altered = bytearray(make_record(ident, name="alter").encode())
        altered[-70] ^= 1                         # a byte of the signed fields
        forged = dataclasses.replace(make_record(name="forged"), signature=b"\x01" * 64)
        expired = make_record(name="old", now=time.time() - 400, ttl=300)
        reg.records = [good.encode(), bytes(altered), forged.encode(), expired.encode(),
                       b"junk"]
        _agent, comp, _ = make_discovery(with_dht=False, coordinators=[reg.url])
        await comp.start()
        try:
            res = await comp.lookup("ocr")
            assert [w["name"] for w in res.workers] == ["good"]
            assert comp.stats()["discovery"]["bad_records"] == 4
        finally:
            await comp.stop()


async def test_broken_coordinators_do_not_break_lookups():
    async with Registry() as bad1, Registry() as bad2, Registry() as good:
        bad1.mode, bad2.mode = "500", "garbage"
        good.records = [make_record(name="w", endpoint=good.url).encode()]
        _agent, comp, _ = make_discovery(
            with_dht=False, coordinators=[bad1.url, "http://127.0.0.1:9", bad2.url, good.url])
        await comp.start()
        try:
            res = await comp.lookup("ocr")
            assert res.source == "coordinator" and [w["name"] for w in res.workers] == ["w"]
        finally:
            await comp.stop()


async def test_everything_down_serves_the_last_known_answer():
    async with Registry() as reg:
        reg.records = [make_record(reg.identity, name="w", endpoint=reg.url).encode()]
        _agent, comp, dht = make_discovery(coordinators=[reg.url], cache_ttl=1)
        await comp.start()
        try:
            assert (await comp.lookup("ocr")).source == "coordinator"
            await comp.prober.drain()
            assert comp.prober.counts["ok"] == 1
            dht.fail = True
            reg.mode = "slow"
            comp.coordinator_timeout_s = 0.2
            async with asyncio.timeout(10):   # the registry answers only at the end
                res = await comp.lookup("ocr", fresh=True)
            assert res.source == "cache" and [w["name"] for w in res.workers] == ["w"]
            assert comp.stats()["discovery"]["stale_answers"] == 1
        finally:
            await comp.stop()


@pytest.fixture
def real_coordinator(tmp_path):
    """A real coordinator process (``rma-agent run``, tests/cluster.py) with 3 workers
    registered over HTTP (``POST /api/services/register``); yields (cluster, url, names)."""
    with Cluster(tmp_path) as cl:
        coord = cl.coordinator("coord")
        cl.start(coord)
        cl.wait_ready(coord)
        names = [f"reg-{i}" for i in range(3)]
        for i, name in enumerate(names):
            rec = make_record(name=name, load=float(i), services=("ocr", "tts"),
                              endpoint=coord.url)
            status, body = coord.post("/api/services/register",
                                      {"record": base64.b64encode(rec.encode()).decode()})
            assert status == 200, body
        yield cl, coord.url, names


@pytest.mark.slow
async def test_real_coordinator_process_registry(real_coordinator):
    """Workers registered only at a real coordinator are found, source = coordinator."""
    _cl, url, names = real_coordinator
    _agent, comp, _ = make_discovery(with_dht=False, coordinators=[url])
    await comp.start()
    try:
        res = await comp.lookup("tts")
        assert res.source == "coordinator"
        assert sorted(w["name"] for w in res.workers) == names
    finally:
        await comp.stop()


@pytest.mark.slow
def test_agent_with_unreachable_dht_answers_from_the_coordinator(real_coordinator):
    """Two real processes: a worker agent whose DHT seeds are unreachable asks, through its
    own HTTP API, and is answered from the coordinator's registry (source = coordinator)."""
    cl, url, names = real_coordinator
    nobody = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    lonely = cl.worker("lonely", seeds=[nobody], coordinators=[url])
    cl.start(lonely)
    cl.wait_healthy(lonely)
    status, body = lonely.get("/api/services/tts", timeout=10)
    assert status == 200, body
    assert body["source"] == "coordinator"
    assert sorted(w["name"] for w in body["workers"]) == names
    status, stats = lonely.get("/api/dht/stats", timeout=10)
    assert status == 200 and stats["joined"] is False
    # this lookup (and any the worker's own start made) answered by the fallback
    assert stats["discovery"]["fallbacks"] >= 1
    assert stats["discovery"]["by_source"]["coordinator"] >= 1


async def test_large_registry_answer_is_read_whole():
    """1000 records (~460 KB of JSON, many TCP chunks) all arrive and verify."""
    async with Registry() as reg:
        ident_records = [make_record(name=f"w{i}", endpoint=reg.url) for i in range(1000)]
        reg.records = [r.encode() for r in ident_records]
        _agent, comp, _ = make_discovery(with_dht=False, coordinators=[reg.url],
                                         max_results=1000)
        await comp.start()
        try:
            res = await comp.lookup("ocr")
            assert res.source == "coordinator" and res.candidates == 1000
            assert len(res.workers) == 1000
        finally:
            await comp.stop()


async def test_a_watch_of_a_service_the_dht_lacks_does_not_poll_coordinators_every_second():
    """A watch refreshes its service from the DHT every second; when the DHT has no
    workers of it (nobody serves it yet, or all left), each refresh fell back to every
    coordinator over HTTP — one request per second per watched service, from every
    agent with a dashboard open or a ``rma-agent watch``. A paced refresh reuses the
    coordinators' answer for COORDINATOR_REUSE_S; a caller's own fresh lookup does not."""
    import agent.discovery.service as service_mod
    from agent.discovery.watch import ServiceWatch, WatchHub
    from tests.discovery._support import Clock

    clock = Clock()
    async with Registry() as reg:
        agent, comp, _dht = make_discovery(coordinators=[reg.url], clock=clock)
        comp.prober.top = 0
        await comp.start()
        try:
            w = ServiceWatch(WatchHub(agent), "ocr")
            for _ in range(10):                     # ten 1 s refreshes, within the reuse
                await w.refresh()
            assert reg.hits == 1, reg.hits
            clock.advance(getattr(service_mod, "COORDINATOR_REUSE_S", 5.0) + 0.1)
            await w.refresh()
            assert reg.hits == 2
            await comp.lookup("ocr", fresh=True)    # Cache-Control: no-cache asks anew
            assert reg.hits == 3
        finally:
            await comp.stop()
