"""The router against workers that do not play fair (issue 20 items 2 and 6), with real
HTTP stand-ins of worker gateways on loopback and real callers:

* a worker that takes requests and never answers holds at most its share of the
  router's connections (state on both ends: the router's count and the connections the
  worker itself holds), the rest fail over or get a 503 at once, routes to a healthy
  worker keep working, and the worker is backed off while its requests still hang;
* a caller that hangs up releases its slot and the worker sees the connection go;
* a worker that trickles its response head gets no more than the attempt budget;
* ``RMA-Not-Processed`` on a 200 or 500 does not send a processed POST to a second worker;
* a worker reported failed over 1,024 times is routed to without a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from agent.dht.identity import Identity
from agent.proof import PROOF_PATH, make_proof, parse_nonce
from agent.router.slots import WorkerSlots
from tests.discovery._support import make_record
from tests.router._support import RouterAgent, StandInGateway
from tests.util import wait_for_async


async def until(pred: Callable[[], Any], what: str) -> None:
    """A state changed by the router's tasks (its sweeper acts once a second)."""
    await wait_for_async(pred, 20.0, what=what)


async def test_a_hanging_worker_holds_at_most_its_share_and_is_backed_off():
    hang = await StandInGateway(mode="hang").start()
    good = await StandInGateway().start()
    try:
        async with RouterAgent() as ra:
            ra.router.slots = WorkerSlots(share=16, overdue_min_s=0.5)
            ra.announce(hang, services=("evil",), capacity=4)
            ra.announce(good, services=("ocr",))
            hid = hang.identity.node_id
            c = ra.client
            callers = [asyncio.create_task(c.get(f"/route/evil/x/{i}")) for i in range(60)]
            async with asyncio.timeout(20):
                await hang.wait_for(lambda: hang.open == 16)
            # the other 44 got a clear 503 at once, while 16 still hang
            await until(lambda: sum(t.done() for t in callers) == 44, "44 answers")
            shed = [t.result() for t in callers if t.done()]
            for r in shed:
                assert r.status == 503, await r.text()
                body = await r.json()
                assert "share of the router's connections" in body["error"]
                assert r.headers["Retry-After"] == "1" and r.headers["RMA-Attempts"] == "0"
            assert ra.router.slots.inflight[hid] == 16 and hang.open == 16
            assert ra.router.counts["outcome_shed"] == 44
            # routes to a healthy worker are untouched
            for i in range(10):
                r = await c.get(f"/route/ocr/fine/{i}")
                assert r.status == 200, await r.text()
            # more than its capacity waited too long: backed off, while they still hang
            await until(lambda: ra.router.slots.suspects >= 1, "the hanging worker reported")
            assert ra.disc.tracker.is_banned(hid, time.time())
            assert hang.open == 16 and hang.most_open == 16
            r = await c.get("/route/evil/x/after")
            assert r.status == 404, await r.text()
            stats = ra.agent.stats()["router_detail"]["workers"]
            assert stats["shed"] == 44 and stats["max_in_flight_per_worker"] == 16
            # the callers give up: every held request is dropped at the worker too
            for t in callers:
                t.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            async with asyncio.timeout(20):
                await hang.wait_for(lambda: hang.open == 0)
            assert hang.gone == 16
            await until(lambda: not ra.router.slots.inflight, "slots released")
            assert hang.most_open == 16
    finally:
        await hang.stop()
        await good.stop()


async def test_a_caller_that_hangs_up_frees_the_slot_and_the_worker_sees_it():
    hang = await StandInGateway(mode="hang").start()
    try:
        async with RouterAgent() as ra:
            ra.announce(hang)
            hid = hang.identity.node_id
            _reader, writer = await asyncio.open_connection("127.0.0.1", ra.client.port)
            writer.write(b"GET /route/ocr/wait HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(20):
                await hang.wait_for(lambda: hang.open == 1)
            assert ra.router.slots.inflight == {hid: 1}
            writer.close()                                   # the caller hangs up
            async with asyncio.timeout(20):
                await hang.wait_for(lambda: hang.gone == 1)  # ... and the worker sees it
            await until(lambda: ra.router.counts["outcome_aborted"] == 1, "abort counted")
            assert ra.router.slots.inflight == {}
            assert ra.router.slots.stats(time.monotonic())["waiting_for_headers"] == 0
            # nobody's failure: the worker is not backed off for it
            assert not ra.disc.tracker.is_banned(hid, time.time())
    finally:
        await hang.stop()


async def _trickling_gateway(identity: Identity) -> tuple[asyncio.Server, str]:
    """A raw gateway: a valid proof, then a response head sent one byte every 0.1 s."""
    state: dict[str, str] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                if target.startswith(PROOF_PATH):
                    nonce = parse_nonce(target.partition("nonce=")[2])
                    body = json.dumps(make_proof(identity, nonce, state["endpoint"])).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                for _ in range(10_000):
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: " if _ == 0 else b"a")
                    await writer.drain()
                    await asyncio.sleep(0.1)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state["endpoint"] = f"http://127.0.0.1:{port}"
    return server, state["endpoint"]


async def test_a_trickled_response_head_gets_no_more_than_the_attempt_budget():
    ident = Identity.generate()
    server, endpoint = await _trickling_gateway(ident)
    try:
        async with RouterAgent() as ra:
            cfg = ra.agent.config
            ra.agent.config = dataclasses.replace(
                cfg, gateway=dataclasses.replace(cfg.gateway, upstream_timeout=1))
            ra.router.connect_timeout_s = 0.5
            assert ra.router.attempt_budget_s == 1.5
            ra.dht.add(make_record(ident, endpoint=endpoint, services=("ocr",)))
            # every byte arrives well inside the 1 s read timeout: only the budget ends it
            r = await ra.client.get("/route/ocr/slow")
            assert r.status == 502, await r.text()
            assert "no response headers in time" in (await r.json())["error"]
            assert ra.router.counts["outcome_failed"] == 1
            assert ra.disc.tracker.is_banned(ident.node_id, time.time())
            assert ra.router.slots.inflight == {}
    finally:
        server.close()
        await server.wait_closed()


async def test_not_processed_is_believed_only_on_502_and_503():
    for mode, status in (("lie500", 500), ("lie200", 200)):
        liar = await StandInGateway(mode=mode).start()
        other = await StandInGateway().start()
        try:
            async with RouterAgent() as ra:
                ra.announce(liar, load=0.0, capacity=8)
                ra.announce(other, load=3.0, capacity=4)
                served: Counter[str] = Counter()
                for i in range(60):        # until the draw has put the liar first
                    r = await ra.client.post(f"/route/ocr/charge/{i}", data=b"pay 1 EUR")
                    served[r.headers["RMA-Worker"]] += 1
                    if r.headers["RMA-Worker"] == liar.identity.node_id.hex():
                        assert r.status == status, await r.text()
                        assert r.headers["RMA-Attempts"] == "1"
                        assert (await r.json()) == {"processed": True}
                        break
                assert served[liar.identity.node_id.hex()] == 1, served
                # every POST was processed exactly once: none sent on to the other worker
                assert len(liar.requests) + len(other.requests) == sum(served.values())
                assert ra.router.counts["retry_not_processed"] == 0
        finally:
            await liar.stop()
            await other.stop()


async def test_a_worker_failed_over_1024_times_is_routed_to_without_a_500():
    now = [time.time()]
    gw = await StandInGateway(mode="fail").start()        # answers 502: one more failure
    try:
        async with RouterAgent(clock=lambda: now[0]) as ra:
            ra.announce(gw)
            wid = gw.identity.node_id
            # first use: proof checked (and probed once), the 502 backs the worker off
            r = await ra.client.get("/route/ocr/x")
            assert r.status == 502 and r.headers["RMA-Worker"] == wid.hex()
            health = ra.disc.tracker.get(wid)
            assert health is not None and health.failures == 1
            health.failures = 5000                        # as if reported failed 5,000 times
            now[0] += 3600.0                              # its back-off is long over
            ra.dht.add(make_record(gw.identity, endpoint=gw.endpoint, now=now[0]))
            assert not ra.disc.tracker.is_banned(wid, now[0])
            r = await ra.client.get("/route/ocr/x")
            assert r.status == 502, await r.text()         # the worker's own 502, relayed
            assert r.headers["RMA-Worker"] == wid.hex()
            assert ra.disc.tracker.get(wid).failures == 5001
            assert ra.disc.tracker.is_banned(wid, now[0])
            assert (await ra.client.get("/route/ocr/x")).status == 404
    finally:
        await gw.stop()


async def test_share_is_enforced_on_the_pool_not_only_counted():
    """The router never has more connections open to one worker than its share,
    counted by the worker itself over many waves of callers."""
    hang = await StandInGateway(mode="hang").start()
    try:
        async with RouterAgent() as ra:
            ra.router.slots = WorkerSlots(share=8, overdue_min_s=60.0)
            ra.announce(hang, capacity=1000)
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{ra.client.port}/route/ocr/w"
                for wave in range(3):
                    tasks = [asyncio.create_task(s.get(url)) for _ in range(40)]
                    async with asyncio.timeout(20):
                        await hang.wait_for(lambda: hang.open == 8)
                    await until(lambda ts=tasks: sum(t.done() for t in ts) == 32, "32 shed")
                    assert hang.most_open == 8, wave
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    async with asyncio.timeout(20):
                        await hang.wait_for(lambda: hang.open == 0)
                    await until(lambda: not ra.router.slots.inflight, "slots released")
            assert hang.gone == 24 and ra.router.slots.shed == 96
    finally:
        await hang.stop()
