"""HTTP routes of the DHT component.

- ``GET /api/dht/topology``: this node and its routing-table contacts as nodes and links
  (self -> contact). The platform's frontend draws it; a whole-network picture is the
  union over agents, which is exactly what tests use to prove a client-mode node is in
  nobody's routing table.
- ``GET /api/dht/bootstrap``: ``{"seeds": ["ip:port", ...]}`` — our own UDP address when
  we are a reachable server, then routing-table contacts (servers by construction), at
  most ``MAX_SEEDS``. New nodes put this URL in ``dht.bootstrap``.
- ``GET /api/dht/providers/{service}``: the raw verified records a DHT lookup returns,
  with the lookup's own duration. A debugging aid (and what the multi-process tests time);
  ranked answers are discovery's ``/api/services/{name}``. Every call is a crawl, so
  concurrent calls for one service share one (single-flight) and new crawls draw on the
  agent's crawl budget (:mod:`agent.discovery.crawl_limit`): 429 JSON when it is spent.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from agent.concurrency import SingleFlight
from agent.dht.record import ALL_SERVICES, normalize_service, valid_service_name

if TYPE_CHECKING:
    from agent.dht.identity import Identity
    from agent.dht.record import WorkerRecord
    from agent.dht.server import DHTNode
    from agent.interfaces import AgentAPI


class DHTView(Protocol):
    """What the routes read of the DHT component (``component.DHTComponent``), named
    here so this module does not import the component that mounts it."""

    @property
    def agent(self) -> AgentAPI: ...

    @property
    def identity(self) -> Identity | None: ...

    @property
    def mode(self) -> str: ...

    @property
    def node(self) -> DHTNode | None: ...

    def contacts(self) -> list[tuple[str, str, int]]: ...

    async def find_providers(self, service: str,
                             limit: int | None = None) -> list[WorkerRecord]: ...

MAX_SEEDS = 20


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _own_seed(dht: DHTView, request: web.Request) -> str | None:
    """Our advertised UDP address, or None when we are a client (unreachable)."""
    if dht.mode != "server" or dht.node is None:
        return None
    listen = dht.agent.config.dht.listen
    host = listen.host
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        # Listening on all interfaces: the address this HTTP request reached is the best
        # guess of an address the caller can reach us on.
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        if not sock:
            return None
        host = str(sock[0])
    if _is_loopback(host) and not _is_loopback(_caller(request)):
        # Reached through a proxy or tunnel (the HTTP port is on loopback by default): a
        # loopback seed would point the caller at itself. Contacts are still listed.
        return None
    return _fmt(host, listen.port)


def _caller(request: web.Request) -> str:
    """The original caller's address: cloudflared and proxies connect from loopback and
    name the caller in a header."""
    for header in ("CF-Connecting-IP", "X-Forwarded-For", "X-Real-IP"):
        value = request.headers.get(header)
        if value:
            return value.split(",")[0].strip()
    return request.remote or ""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return host == "localhost"


def bootstrap_handler(dht: DHTView) -> Any:
    """``GET /api/dht/bootstrap``: served on the admin API, and on a coordinator's gateway."""

    async def bootstrap(request: web.Request) -> web.Response:
        seeds: list[str] = []
        own = _own_seed(dht, request)
        if own:
            seeds.append(own)
        for _cid, ip, port in dht.contacts():
            s = _fmt(ip, port)
            if s not in seeds:
                seeds.append(s)
            if len(seeds) >= MAX_SEEDS:
                break
        return web.json_response({"seeds": seeds})

    return bootstrap


def add_routes(app: web.Application, dht: DHTView) -> None:
    crawls = SingleFlight()

    async def topology(request: web.Request) -> web.Response:
        if dht.identity is None or dht.node is None:
            return web.json_response({"error": "dht: not started"}, status=503)
        node_id = dht.identity.node_id.hex()
        listen = dht.agent.config.dht.listen
        me = {"id": node_id, "ip": listen.host, "port": listen.port,
              "role": dht.agent.config.agent.role, "mode": dht.mode, "self": True}
        nodes: list[dict[str, Any]] = [me]
        links: list[dict[str, str]] = []
        for cid, ip, port in dht.contacts():
            nodes.append({"id": cid, "ip": ip, "port": port})
            links.append({"source": node_id, "target": cid})
        return web.json_response({"self": me, "nodes": nodes, "links": links,
                                  "generated_at": time.time()})

    async def providers(request: web.Request) -> web.Response:
        service = normalize_service(request.match_info["service"])
        if not (service == ALL_SERVICES or valid_service_name(service)):
            return web.json_response(
                {"error": f"bad service name {service!r}: letters, digits, '.', '_', '-' "
                          "(max 63), or '*'"}, status=400)
        async def crawl() -> tuple[list[Any], float]:
            t0 = time.perf_counter()
            found = await dht.find_providers(service)
            return found, time.perf_counter() - t0

        if service not in crawls:
            disc = dht.agent.discovery
            limit = disc.crawl_limit if disc is not None else None
            if limit is not None and not limit.take():
                return limit.too_many()
        records, elapsed = await crawls.run(service, crawl)
        return web.json_response({"service": service, "count": len(records),
                                  "elapsed_ms": round(elapsed * 1000, 3),
                                  "records": [r.to_json() for r in records]})

    app.router.add_get("/api/dht/topology", topology)
    app.router.add_get("/api/dht/bootstrap", bootstrap_handler(dht))
    app.router.add_get("/api/dht/providers/{service}", providers)
