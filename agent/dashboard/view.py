"""What the dashboard page shows: the agent at a glance, each service's explained
ranking, and the XOR ring of the routing table.

Pure reads of what the agent already knows (the DHT's contacts and topology, the
watches' answers, discovery's cached candidates and tracker): building a page's state
makes no network request. Each number is JSON-safe (non-finite -> null).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.dht.record import ALL_SERVICES, service_key
from agent.discovery.explain import add_route_costs, explain_set, worker_state
from agent.discovery.select import Query

if TYPE_CHECKING:
    from agent.discovery.watch import WatchHub
    from agent.interfaces import AgentAPI, DHTService, DiscoveryService

MAX_ROWS = 50              # workers (and excluded ones) per service in a page's state
MAX_OTHERS = 500           # workers listed on the ring that are no routing contact
WEIGHT_NAMES = ("free", "gpu", "region", "latency", "age")


def num(x: Any, nd: int = 4) -> Any:
    """JSON-safe rounded number (non-finite -> None)."""
    if x is None or isinstance(x, bool):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return round(v, nd) if math.isfinite(v) else None


def overview(agent: AgentAPI, hub: WatchHub, services: list[str],
             has_router: bool) -> dict[str, Any]:
    """The agent at a glance, and the network as this node sees it."""
    dht = agent.dht
    ok, reasons = agent.readiness()
    identity = dht.identity if dht is not None else None
    node_id = identity.node_id if identity is not None else b""
    contacts = {bytes.fromhex(c[0]) for c in dht.contacts()} if dht is not None else set()
    star = hub.get(ALL_SERVICES)
    workers = set(star.records) if star is not None else set()
    mode = dht.mode if dht is not None else None
    servers = contacts | ({node_id} if node_id and mode == "server" else set())
    nodes = servers | workers | ({node_id} if node_id else set())
    coordinators = servers - workers
    cfg = agent.config.agent
    if cfg.role == "coordinator" and node_id:
        coordinators.add(node_id)
    return {
        "name": cfg.name, "role": cfg.role, "region": cfg.region, "version": __version__,
        "node_id": node_id.hex(), "mode": mode,
        "peers": dht.peers() if dht is not None else 0,
        "ready": ok, "reasons": reasons,
        "uptime_s": round(time.time() - agent.started_at, 1),
        "nodes": len(nodes), "coordinators": len(coordinators),
        "workers": len(workers), "services": len(services),
        "router": has_router,
        # the fleet's versions (record format 2's agent_version; "" = a v1 record)
        # closed networks: the admission certificate's expiry and its renewal state
        "certificate": agent.worker.renewal_state() if agent.worker is not None else None,
        "versions": dict(sorted(Counter(
            r.agent_version for r in
            (star.records.values() if star is not None else ())).items())),
    }


def service_state(disc: DiscoveryService, hub: WatchHub, service: str,
                  now: float) -> dict[str, Any] | None:
    """One service's explained ranking (best first, score parts, why others are out)."""
    w = hub.get(service)
    if w is None:
        return None
    entry = disc.cached(service)
    if entry is None:
        return {"name": service, "source": w.source, "workers": [], "excluded": []}
    q = Query(limit=min(MAX_ROWS, disc.max_results),
              caller_region=disc.agent.config.agent.region)
    out = explain_set(entry.candidates, q, now, disc.tracker, disc.scorer, disc.weights,
                      max_excluded=MAX_ROWS)
    router = disc.agent.router
    if router is not None:                  # the router's own cost parts per worker
        add_route_costs(out["workers"], router, service)
    workers = []
    cs = entry.candidates
    for v in out["workers"]:
        rec = cs.records[cs.index[bytes.fromhex(v["id"])]]
        workers.append({
            "id": v["id"], "name": v["name"], "endpoint": v["endpoint"], "gpu": v["gpu"],
            "version": rec.agent_version,          # "" for a record of format 1
            "gpu_memory_gb": num(v["gpu_memory_gb"], 1), "load": num(v["load"], 2),
            "capacity": num(v["capacity"], 2), "region": v["region"],
            "age_s": num(v["age_s"], 1), "latency_ms": num(v["latency_ms"], 1),
            "score": num(v["score"]), "state": v["state"], "rank": v["rank"],
            "components": {k: num(x) for k, x in v["components"].items()},
            "router": v.get("router")})
    excluded = [{"id": x["id"], "name": x["name"], "gpu": x["gpu"],
                 "region": x["region"], "load": num(x["load"], 2),
                 "capacity": num(x["capacity"], 2),
                 "state": worker_state(disc.tracker, bytes.fromhex(x["id"]), now)
                 if x["state"] != "-" else "-", "reason": x["reason"]}
                for x in out["excluded"]]
    return {"name": service, "source": w.source, "workers": workers, "excluded": excluded,
            "excluded_total": out["excluded_total"]}


def weights(disc: DiscoveryService | None) -> dict[str, float]:
    """The ranking weights by name (none without discovery)."""
    return dict(zip(WEIGHT_NAMES, disc.weights if disc is not None else (), strict=False))


def ring(dht: DHTService, me: bytes, hub: WatchHub, k: int,
         service: str | None) -> dict[str, Any]:
    """The XOR ring around ``me`` (this node's id): its routing contacts by bucket and
    shared prefix, the workers that are no contact, and for ``service`` the k closest
    routing nodes to its key (where its records live)."""
    me_int = int.from_bytes(me, "big")
    topo = dht.topology()
    star = hub.get(ALL_SERVICES)
    workers = set(star.records) if star is not None else set()
    contacts = []
    for c in topo.contacts:
        dist = me_int ^ int.from_bytes(c.node_id, "big")
        contacts.append({"id": c.node_id.hex(), "ip": c.ip, "port": c.port,
                         "bucket": c.bucket, "prefix": 160 - dist.bit_length(),
                         "worker": c.node_id in workers})
    contact_ids = {c.node_id for c in topo.contacts}
    out: dict[str, Any] = {
        "self": me.hex(), "mode": dht.mode, "k": k, "buckets": topo.buckets,
        "contacts": contacts, "workers_known": len(workers),
        # workers that are no routing contact (DHT clients behind NAT): nodes of the
        # network all the same
        "others": [{"id": wid.hex(), "name": star.records[wid].name}
                   for wid in sorted(workers - {me} - contact_ids)][:MAX_OTHERS]
        if star is not None else [],
        "service": service, "key": None, "closest": []}
    if service:
        key = service_key(service)
        kint = int.from_bytes(key, "big")
        # the k closest *routing* nodes (servers): where the service's records live
        ids = ([me] if dht.mode == "server" else []) + sorted(contact_ids)
        ids.sort(key=lambda b: kint ^ int.from_bytes(b, "big"))
        out["key"] = key.hex()
        out["closest"] = [b.hex() for b in ids[:k]]
    return out
