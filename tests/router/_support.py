"""Helpers for the router tests: a real HTTP stand-in for a worker's gateway (the same
contract: ``ANY /{service}/{path}`` and the ownership proof via ``agent.proof``), and an
in-process agent with discovery and the router."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.dht.identity import Identity
from agent.httpapi import make_app
from agent.proof import PROOF_PATH, ProofError, make_proof, parse_nonce
from agent.router.component import RouterComponent
from tests.discovery._support import make_discovery, make_record


class StandInGateway:
    """A worker's gateway as the router sees it. ``mode``: "echo" answers with what it
    got; "full" answers 503 + RMA-Not-Processed; "fail" answers 502; "hang" never
    answers (it proves ownership, takes requests and waits until the caller goes away:
    ``open`` counts the requests it holds, ``gone`` those whose caller hung up);
    "lie500"/"lie200" process the request, then answer 500/200 with
    ``RMA-Not-Processed: 1``. ``claim`` is the endpoint the proof names (default: its
    own URL); ``signer`` signs the proof (default: its own identity) — set either to
    make it an impostor."""

    def __init__(self, identity: Identity | None = None, mode: str = "echo") -> None:
        self.identity = identity or Identity.generate()
        self.mode = mode
        self.claim: str | None = None
        self.signer: Identity | None = None
        self.requests: list[dict[str, Any]] = []
        self.arrived: list[str] = []      # paths whose head came in (their body may not have)
        self.proofs = 0
        self.open = 0
        self.most_open = 0
        self.gone = 0
        self.changed = asyncio.Event()    # set on every arrival and departure (mode "hang")
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> StandInGateway:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get(PROOF_PATH, self.proof)
        app.router.add_route("*", "/{service}/{path:.*}", self.serve)
        # handler_cancellation: a "hang" handler learns that its caller went away
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def proof(self, request: web.Request) -> web.Response:
        self.proofs += 1
        try:
            nonce = parse_nonce(request.query.get("nonce", ""))
        except ProofError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(make_proof(self.signer or self.identity, nonce,
                                            self.claim or self.endpoint))

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(request.path)
        h = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            size += len(chunk)
        self.requests.append({"method": request.method, "path": request.path,
                              "query": request.raw_path.partition("?")[2], "size": size,
                              "headers": dict(request.headers)})
        if self.mode == "hang":
            return await self._hang()
        if self.mode in ("lie500", "lie200"):
            return web.json_response({"processed": True},
                                     status=500 if self.mode == "lie500" else 200,
                                     headers={"RMA-Not-Processed": "1"})
        if self.mode == "full":
            return web.json_response({"error": "full"}, status=503,
                                     headers={"RMA-Not-Processed": "1", "Retry-After": "1"})
        if self.mode == "fail":
            return web.json_response({"error": "upstream down"}, status=502)
        if request.path.endswith("/redirect"):
            return web.Response(status=302, headers={"Location": "http://10.0.0.1/steal"})
        if request.path.endswith("/empty"):
            return web.Response(status=204)
        return web.json_response({"method": request.method, "path": request.path,
                                  "query": request.raw_path.partition("?")[2], "size": size,
                                  "sha256": h.hexdigest(),
                                  "headers": {k.lower(): v for k, v in request.headers.items()}},
                                 headers={"X-Served-By": self.identity.node_id.hex()})


    async def _hang(self) -> web.StreamResponse:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.changed.set()
        try:
            await asyncio.Event().wait()          # until the caller hangs up
        except asyncio.CancelledError:
            self.gone += 1
            raise
        finally:
            self.open -= 1
            self.changed.set()
        raise AssertionError("unreachable")

    async def wait_for(self, pred: Any) -> None:
        """Until ``pred()`` holds (checked on every arrival and departure); callers
        bound it with ``asyncio.timeout``."""
        while not pred():
            self.changed.clear()
            await self.changed.wait()


class RouterAgent:
    """An agent (not a process) with a stand-in DHT, discovery and the router, served on
    a real loopback port through the agent's own aiohttp app."""

    def __init__(self, **cfg: Any) -> None:
        self.agent, self.disc, self.dht = make_discovery(**cfg)
        assert self.dht is not None
        self.disc.rng = random.Random(1)
        self.router = RouterComponent(self.agent)
        self.agent.components.append(self.router)
        self.client: TestClient | None = None

    def announce(self, gw: StandInGateway, *, endpoint: str | None = None,
                 services: tuple[str, ...] = ("ocr",), **kw: Any) -> None:
        self.dht.add(make_record(gw.identity, endpoint=endpoint or gw.endpoint,
                                 services=services, now=time.time(), **kw))

    async def __aenter__(self) -> RouterAgent:
        self.client = TestClient(TestServer(make_app(self.agent), handler_cancellation=True))
        await self.client.start_server()
        await self.disc.start()
        await self.router.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.router.stop()
        await self.disc.stop()
        assert self.client is not None
        await self.client.close()
