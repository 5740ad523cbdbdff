""""Why this worker": a ranking's score split into its parts, and why others were left out.

``GET /api/services/{name}?explain=1`` (and ``rma-agent lookup SERVICE --explain``)
answers the same ranked list as the plain lookup, in its deterministic order (before the
top-3 draw), where every worker also carries ``components``: the terms of the score
formula of :mod:`_fast` (``score_py`` is the reference)::

    load     =  w_free    * free          free = clamp((capacity - load) / capacity, 0, 1)
    gpu      =  w_gpu     * gpu_class
    region   =  w_region  * same_region
    latency  = -w_latency * lat           lat = latency_ms / (latency_ms + 50), 0.5 unknown
    age      = -w_age     * age / max_age
    health   =  0                         failing workers are excluded, not penalised

Summed left to right (``load + gpu + region + latency + age + health``) they give the
``score`` bit for bit: the kernels evaluate ``w_f*free + w_g*gpu + w_r*r - w_l*lat -
w_a*agef`` in exactly that order, and adding a negated term is the same IEEE operation
as subtracting it. The score itself comes from the kernel (``CandidateSet.ranked``, the
call the lookup makes), so this explains the number the ranking used rather than
recomputing a look-alike; ``tests/discovery/test_explain.py`` checks the sum against both
kernels.

``excluded`` lists workers that were not offered and the rule that left each out:
the query's filters (region, GPU class, GPU memory), a failure back-off, staleness or
expiry (from the cached set, or the DHT's current answer), a withdrawal this node
stores, a record that does not list the service, a failed endpoint ownership proof, an
endpoint callers may not contact (:mod:`agent.discovery.endpoints`), or the ``limit``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.discovery.endpoints import Allowance, endpoint_refusal
from agent.discovery.select import (
    DEFAULT_WEIGHTS,
    TOP_RANDOM,
    CandidateSet,
    Query,
    RecordLike,
    record_max_age,
)

if TYPE_CHECKING:
    from agent.discovery.latency import LatencyTracker
    from agent.interfaces import DiscoveryService, RouterService

COMPONENTS = ("load", "gpu", "region", "latency", "age", "health")
RAW_TIMEOUT_S = 2.0
MAX_EXCLUDED = 1000      # exclusions itemised per answer ("excluded_total" counts them all)


def score_terms(load: float, capacity: float, gpu_score: float, age_s: float,
                latency_ms: float, region_match: bool, weights: Sequence[float],
                max_age_s: float) -> dict[str, float]:
    """The score's terms for one row, in the pure-Python twin's own operations."""
    wf, wg, wr, wl, wa = (float(w) for w in weights)
    if capacity > 0.0:
        free = (capacity - load) / capacity
        if not (free >= 0.0):
            free = 0.0
        elif free > 1.0:
            free = 1.0
    else:
        free = 0.0
    if latency_ms >= 0.0:
        lat = 1.0 if latency_ms == math.inf else latency_ms / (latency_ms + 50.0)
    else:
        lat = 0.5
    agef = age_s / max_age_s if max_age_s > 0.0 else 0.0
    r = 1.0 if region_match else 0.0
    return {"load": wf * free, "gpu": wg * gpu_score, "region": wr * r,
            "latency": -(wl * lat), "age": -(wa * agef), "health": 0.0}


def terms_sum(terms: dict[str, float]) -> float:
    """Left to right, in the kernels' order (see the module docstring)."""
    total = terms["load"] + terms["gpu"]
    total = total + terms["region"]
    total = total + terms["latency"]
    total = total + terms["age"]
    return total + terms["health"]


def worker_state(tracker: LatencyTracker | None, worker_id: bytes, now: float) -> str:
    """ok | backed off (inside a failure back-off: not offered) | failing (failed
    lately, back-off over, offered again) | proof failed (its endpoint's ownership)."""
    st = tracker.get(worker_id) if tracker is not None else None
    if st is None:
        return "ok"
    if st.proof_failed:
        return "proof failed"
    if st.banned_until > now:
        return "backed off"
    if st.failures > 0:
        return "failing"
    return "ok"


def _row_terms(cs: CandidateSet, i: int, now: float, q: Query,
               weights: Sequence[float]) -> dict[str, float]:
    a = now - cs.issued[i]
    # the age the kernel was given (CandidateSet.ranked, same operations): scaled so that
    # age / cs.max_age_s is the record's age over its *own* max age (2 x its refresh)
    scale = cs.max_age_s
    age = a * scale / cs.max_ages[i] if a > 0.0 else 0.0
    region = cs._region_match(q.caller_region)
    return score_terms(cs.load[i], cs.capacity[i], cs.gpu_score[i], age,
                       cs._lat[i], bool(region[i]), weights, cs.max_age_s)


def _filter_reason(cs: CandidateSet, i: int, q: Query, scorer: Any) -> str | None:
    rec = cs.records[i]
    if q.region and cs.regions_lower[i] != q.region.lower():
        return f"region filter: {rec.region or '(none)'} is not {q.region}"
    if q.gpu and not scorer.matches(rec.gpu, q.gpu):
        return f"gpu filter: {rec.gpu or 'no GPU'} is not in the class of {q.gpu}"
    if q.min_gpu_memory_gb is not None and cs.gpu_memory[i] < q.min_gpu_memory_gb:
        return (f"gpu memory filter: {cs.gpu_memory[i]:g} GB < "
                f"{q.min_gpu_memory_gb:g} GB")
    return None


def _who(rec: RecordLike) -> dict[str, Any]:
    return {"id": rec.worker_id.hex(), "name": rec.name, "endpoint": rec.endpoint,
            "gpu": rec.gpu, "region": rec.region, "load": rec.load, "capacity": rec.capacity}


def explain_set(cs: CandidateSet, q: Query, now: float, tracker: Any, scorer: Any,
                weights: Sequence[float] = DEFAULT_WEIGHTS,
                raw: Iterable[RecordLike] = (), withdrawn: Iterable[bytes] = (),
                max_age_s: float | None = None,
                allow_http_hosts: Allowance | Iterable[str] | None = None,
                max_excluded: int = MAX_EXCLUDED) -> dict[str, Any]:
    """The explained ranking of ``cs`` for ``q`` at ``now``.

    ``raw``: records of the service from a fresh DHT answer (may hold workers the cached
    set dropped, or newer than it); ``withdrawn``: worker ids this node holds a
    tombstone for. Returns ``{"workers": [...], "excluded": [...], "excluded_total": n}``;
    at most ``max_excluded`` exclusions are itemised (a service may have thousands).
    """
    pairs = cs.ranked(now, q, tracker, weights)          # the kernel, as the lookup calls it
    offered = pairs[:q.limit]
    workers = [_offered_row(cs, i, score, rank, now, q, tracker, weights)
               for rank, (i, score) in enumerate(offered, 1)]
    seen = {i for i, _ in offered}
    ranked_idx = {i: n for n, (i, _) in enumerate(pairs, 1)}
    excluded: list[dict[str, Any]] = []
    bans = tracker.current_bans(now) if tracker is not None else {}
    mask = cs._filter_mask(q)
    total = 0
    for i, rec in enumerate(cs.records):
        if i in seen:
            continue
        total += 1
        if len(excluded) >= max_excluded:
            continue
        state = worker_state(tracker, cs.ids[i], now)
        reason = _filter_reason(cs, i, q, scorer) if not mask[i] else None
        if reason is None:
            reason = _cached_reason(cs, i, q, now, state, bans, tracker, ranked_idx.get(i),
                                    len(pairs))
        excluded.append({**_who(rec), "state": state, "reason": reason})
    # records the cached set does not hold at all
    gone = set(withdrawn)
    max_age = cs.max_age_s if max_age_s is None else max_age_s
    newest = _newest(raw)
    for wid, rec in newest.items():
        if wid in cs.index:
            continue
        total += 1
        if len(excluded) >= max_excluded:
            continue
        reason = _raw_reason(rec, cs.service, now, wid in gone, max_age, allow_http_hosts)
        excluded.append({**_who(rec), "state": "-", "reason": reason})
    for wid in gone - set(newest) - set(cs.index):
        total += 1
        if len(excluded) >= max_excluded:
            continue
        excluded.append({"id": wid.hex(), "name": "", "endpoint": "", "gpu": "", "region": "",
                         "load": None, "capacity": None, "state": "-",
                         "reason": "withdrawn (the worker left the network)"})
    return {"workers": workers, "excluded": excluded, "excluded_total": total}


def _offered_row(cs: CandidateSet, i: int, score: float, rank: int, now: float, q: Query,
                 tracker: Any, weights: Sequence[float]) -> dict[str, Any]:
    """An offered worker's view with its rank, unrounded score and the score's parts."""
    view = cs.view(i, now, score)
    terms = _row_terms(cs, i, now, q, weights)
    view["rank"] = rank
    view["score"] = score                            # unrounded: the parts add up to it
    view["components"] = terms
    view["components_sum"] = terms_sum(terms)
    view["state"] = worker_state(tracker, cs.ids[i], now)
    return view


def _cached_reason(cs: CandidateSet, i: int, q: Query, now: float, state: str,
                   bans: Mapping[bytes, float], tracker: Any, rank: int | None,
                   n_ranked: int) -> str:
    """Why row ``i`` of the cached set, which passed the query's filters, is not offered
    (``rank``: its place in the full ranking, None when it was not ranked at all)."""
    wid = cs.ids[i]
    if state == "proof failed":
        return ("endpoint ownership proof failed: not offered or routed to until a later "
                "proof is valid")
    if wid in bans:
        st = tracker.get(wid)
        failures = st.failures if st is not None else 0
        return (f"backed off after {failures} failure{'s' if failures != 1 else ''}: "
                f"retry in {max(0.0, bans[wid] - now):.0f} s")
    if cs.expires[i] <= now:
        return "expired"
    if now - cs.issued[i] > cs.max_ages[i]:
        return f"stale: last refreshed {now - cs.issued[i]:.0f} s ago (> {cs.max_ages[i]:g} s)"
    if rank is not None:
        return f"beyond limit={q.limit} (rank {rank})"
    return (f"beyond limit={q.limit}" if n_ranked >= max(q.limit, TOP_RANDOM)
            else "score is not a number")


def _newest(raw: Iterable[RecordLike]) -> dict[bytes, RecordLike]:
    """The highest-seq record of each worker in ``raw``."""
    newest: dict[bytes, RecordLike] = {}
    for rec in raw:
        cur = newest.get(rec.worker_id)
        if cur is None or rec.seq > cur.seq:
            newest[rec.worker_id] = rec
    return newest


def _raw_reason(rec: RecordLike, service: str, now: float, tombstoned: bool, max_age: float,
                allow_http_hosts: Allowance | Iterable[str] | None) -> str:
    """Why a record of the fresh DHT answer is not in the cached set."""
    refused = (endpoint_refusal(rec.endpoint, allow_http_hosts)
               if allow_http_hosts is not None else None)
    if refused is not None:
        return f"endpoint never contacted: {refused}"
    if rec.withdrawn or tombstoned:
        return "withdrawn (the worker left the network)"
    if rec.expires_at <= now:
        return "expired"
    if now - rec.issued_at > (own := record_max_age(rec, max_age)):
        return f"stale: last refreshed {now - rec.issued_at:.0f} s ago (> {own:g} s)"
    if service != "*" and service not in rec.services:
        return "does not list this service"
    return "newer than the cached answer (shown after the cache refreshes)"


def local_tombstones(comp: DiscoveryService, service: str) -> set[bytes]:
    """Worker ids whose withdrawal of ``service`` this node stores (if it stores any)."""
    dht = comp.agent.dht
    storage = dht.storage if dht is not None else None
    if storage is None:
        return set()
    from agent.dht.record import service_key
    try:
        recs = storage.snapshot(service_key(service))
    except Exception:
        return set()
    return {r.worker_id for r in recs if r.withdrawn}


def add_route_costs(workers: list[dict[str, Any]], router: RouterService,
                    service: str) -> None:
    """Each offered worker gets ``router``: this agent's router's cost parts for it
    (outstanding, queue, capacity, ewma_ms, penalty, retry_after, cost, ...), what a
    routed request is sent by (:mod:`agent.router.policy`), not the score above."""
    ids = [(bytes.fromhex(w["id"]), float(w.get("capacity") or 0.0)) for w in workers]
    costs = router.route_costs(service, ids)
    for w, (wid, _cap) in zip(workers, ids, strict=True):
        parts = costs.get(wid)
        if parts is not None:
            w["router"] = {k: round(v, 3) if isinstance(v, float) else v
                           for k, v in parts.items()}


async def explain(comp: DiscoveryService, service: str, q: Query, *,
                  fresh: bool = False) -> dict[str, Any]:
    """The explained answer of ``GET /api/services/{name}?explain=1``."""
    if not q.caller_region and comp.agent.config.agent.region:
        q = Query(q.limit, q.region, q.gpu, q.min_gpu_memory_gb, comp.agent.config.agent.region)
    entry, source = await comp.answer(service, fresh)
    raw: list[RecordLike] = []
    dht = comp.agent.dht
    if dht is not None:
        try:
            raw = list(await asyncio.wait_for(dht.find_providers(service), RAW_TIMEOUT_S))
        except (TimeoutError, OSError):
            raw = []
    now = comp.clock()
    out = explain_set(entry.candidates, q, now, comp.tracker, comp.scorer, comp.weights,
                      raw=raw, withdrawn=local_tombstones(comp, service),
                      allow_http_hosts=Allowance.from_config(comp.agent.config.discovery))
    router = comp.agent.router
    if router is not None:
        add_route_costs(out["workers"], router, service)
    w = comp.weights
    return {
        "service": service, "source": source, "explain": True,
        "generated_at": time.time(),
        "query": {"limit": q.limit, "region": q.region, "gpu": q.gpu,
                  "min_gpu_memory_gb": q.min_gpu_memory_gb, "prefer_region": q.caller_region},
        "weights": {"free": w[0], "gpu": w[1], "region": w[2], "latency": w[3], "age": w[4]},
        "max_age_s": entry.candidates.max_age_s,
        "formula": ("score = load + gpu + region + latency + age + health, where load = "
                    "w_free*free capacity, gpu = w_gpu*GPU class score, region = "
                    "w_region*(same region as the caller), latency = -w_latency*"
                    "latency_ms/(latency_ms+50) (0.5 while unmeasured), age = "
                    "-w_age*age/max_age, health = 0 (failing workers are excluded)"),
        "note": (f"workers are in the deterministic order; a plain lookup draws its first "
                 f"slot at random among the best {TOP_RANDOM}; a routed request is sent by "
                 "the router's own cost (each worker's \"router\", agent/router/policy.py)"),
        **out,
    }
