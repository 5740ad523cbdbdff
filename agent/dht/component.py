"""DHTComponent: config -> a live ``DHTNode``, joined in the background.

Why joining runs in a task: ``start()`` must return quickly (the HTTP endpoint and
READY=1 wait for it), while seeds may be slow, down, or behind names and URLs. The task
retries with jittered exponential backoff, rejoins when the routing table empties, and
re-resolves the seeds when a reload changes ``dht.bootstrap``.

Seeds come from ``dht.bootstrap`` plus the routing-table snapshot a coordinator keeps in
``state_dir/routing.json`` (written by ``CoordinatorRole``), so a restarted coordinator
rejoins even when its config names no seeds.

Readiness: joined (at least one peer), or a coordinator without configured seeds — the
first seed of an empty network has nobody to join and must still be ready.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from typing import TYPE_CHECKING, Any

from agent.admission.component import admitted
from agent.component import Component, cancel_task
from agent.config import default_path
from agent.dht import bootstrap as seeds_mod
from agent.dht.identity import Identity, IdentityError
from agent.dht.metrics import DHTCollector, DHTCounters
from agent.dht.reachability import REACHABLE_TIMEOUT, probe_reachable
from agent.dht.record import WorkerRecord
from agent.dht.server import DHTNode
from agent.interfaces import Topology

if TYPE_CHECKING:
    from aiohttp import web

    from agent.config import Config
    from agent.dht.storage import ProviderStorage
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.dht")

JOIN_TIMEOUT = 15.0          # one bootstrap attempt (pings + crawl) never takes longer
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
MAINTAIN_INTERVAL = 10.0     # how often a joined node checks it still has peers
__all__ = ["DHTComponent", "probe_reachable"]


class DHTComponent(Component):
    """Owns the node, its identity, joining, and the DHT's metrics and HTTP routes."""

    name = "dht"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        cfg = agent.config
        # A broken state dir must end in a one-line "cannot start" (raised from start(),
        # where the run loop reports OSErrors), not a traceback from the constructor.
        self._identity_error: str | None = None
        try:
            self.identity: Identity = Identity.load_or_create(cfg.agent.state_dir)
        except (IdentityError, OSError) as exc:
            self._identity_error = str(exc)
            self.identity = None  # type: ignore[assignment]
        self.node: DHTNode | None = None
        self._joined = False
        # the mode actually in force ("server" | "client"); "auto" is decided at join time
        self.mode = cfg.dht.mode if cfg.dht.mode in ("server", "client") else "client"
        self._mode_decided = cfg.dht.mode != "auto"
        self._said_undecided = False
        self._probe_backoff = BACKOFF_START
        self._next_probe = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._rejoin = False
        self._attempts = 0
        self._unreachable = 0
        self._seed_count = 0
        self._snapshot_seeds = 0
        self._seed_failures: list[str] = []
        self._joined_at: float | None = None
        self._last_join_error = ""
        # lookup accounting (for /api/dht/stats and Prometheus)
        self.counters = DHTCounters()
        self._collector: DHTCollector | None = None

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        from agent.dht import api

        api.add_routes(app, self)

    async def start(self) -> None:
        cfg = self.agent.config
        if self.identity is None:
            raise OSError(f"dht: cannot load or create the node identity in "
                          f"{cfg.agent.state_dir}: {self._identity_error}")
        network = self.agent.admission     # closed networks: only admitted records
        self.node = DHTNode(self.identity, ksize=cfg.dht.ksize, alpha=cfg.dht.alpha,
                            mode=self.mode,
                            admit=network.storage_hook if network is not None else None,
                            on_stored=lambda record: self.agent.emit("record", record))
        try:
            await self.node.listen(cfg.dht.listen.port, cfg.dht.listen.host)
        except OSError as exc:
            self.node = None
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            why = cause.strerror or str(cause)
            raise OSError(f"dht: cannot listen on udp {cfg.dht.listen}: {why}") from exc
        self._register_metrics()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._join_loop(), name="dht-join")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        if self.node is not None:
            try:
                self.node.stop()
            except Exception as exc:     # closing must never block shutdown
                log.warning("dht: error while stopping node: %s", exc)
        self.joined = False

    async def reload(self, old: Config, new: Config) -> None:
        o, n = old.dht, new.dht
        restart_only = [k for k in ("listen", "ksize", "alpha", "mode")
                        if getattr(o, k) != getattr(n, k)]
        if restart_only:
            # (agent.state_dir is reported by the lifecycle itself)
            log.warning("dht: changed %s apply on restart only (systemctl restart rma-agent)",
                        ", ".join(f"dht.{k}" for k in restart_only))
        if o.bootstrap != n.bootstrap:
            log.info("dht: bootstrap seeds changed (%d -> %d entries): rejoining",
                     len(o.bootstrap), len(n.bootstrap))
            self._rejoin = True
            self._attempts = 0
            if self._wake is not None:
                self._wake.set()

    # ------------------------------------------------------------------ joining
    def _own_addresses(self) -> set[tuple[str, int]]:
        listen = self.agent.config.dht.listen
        return seeds_mod.self_addresses(listen.host, listen.port)

    def _family(self) -> int:
        return socket.AF_INET6 if ":" in self.agent.config.dht.listen.host else socket.AF_INET

    async def _gather_seeds(self) -> list[tuple[str, int]]:
        cfg = self.agent.config
        direct = [e for e in cfg.dht.bootstrap if not seeds_mod.is_url(e)]
        urls = [e for e in cfg.dht.bootstrap if seeds_mod.is_url(e)]
        res_direct, res_urls = await asyncio.gather(
            seeds_mod.resolve_seeds(direct, family=self._family(), exclude=self._own_addresses()),
            seeds_mod.resolve_seeds(urls, family=self._family(), exclude=self._own_addresses()))
        # The operator's own seeds (coordinators) republish records for many workers; the
        # storage's per-sender bound must not refuse them. Only directly configured seeds
        # are trusted — never addresses learned from a URL answer or the snapshot.
        if self.node is not None:
            self.node.trust(*(ip for ip, _port in res_direct.addrs))
        snap = [a for a in seeds_mod.load_snapshot(cfg.agent.state_dir)
                if a not in self._own_addresses()]
        self._snapshot_seeds = len(snap)
        addrs: list[tuple[str, int]] = []
        for a in (*res_direct.addrs, *res_urls.addrs, *snap):
            if a not in addrs:
                addrs.append(a)
        failures = res_direct.failures + res_urls.failures
        if failures != self._seed_failures:        # say it when it changes, not every retry
            for failure in failures:
                log.warning("dht: bootstrap entry unusable: %s", failure)
        self._seed_failures = failures
        return addrs

    async def _decide_mode(self, seeds: list[tuple[str, int]], *, after_traffic: bool = False
                           ) -> None:
        """``mode = "auto"``: ask up to three seeds to ping us back.

        Before joining, the question goes out from a separate, ephemeral socket and asks
        for a ping to our DHT port, while our DHT socket has sent nothing to the seed yet:
        behind a NAT the seed's ping then has no connection-tracking entry to ride on and
        is dropped, as any stranger's would be. (Asked from the DHT socket itself, the
        ping-back would pass as a "reply" and every NAT-ed node would turn server.)

        Once joined (``after_traffic``: the seeds answered the DHT but not the probe,
        e.g. they were still starting), our DHT socket has talked to them, so the ping
        goes to a *fresh* port instead, which no NAT has a mapping for: reachable only
        if inbound UDP really is open. No answer at all leaves the mode undecided.
        """
        assert self.node is not None
        port = self.node.port or self.agent.config.dht.listen.port
        host = self.agent.config.dht.listen.host
        verdict: bool | None = None
        asked = 0
        for seed in seeds[:3]:
            asked += 1
            verdict = await probe_reachable(seed, None if after_traffic else port, host,
                                            timeout=REACHABLE_TIMEOUT,
                                            node_id=self.identity.node_id)
            if verdict:
                break
        if verdict is None:
            if not self._said_undecided:
                self._said_undecided = True
                log.info("dht: mode auto: no seed gave a reachability verdict (no answer, or "
                         "no probe capacity); asking again with backoff (client until then)")
            return
        self.mode = "server" if verdict else "client"
        self.node.set_mode(self.mode)
        self._mode_decided = True
        log.info("dht: mode auto -> %s (%s, asked %d seed%s)", self.mode,
                 "reachable on UDP" if verdict else "not reachable on UDP from outside",
                 asked, "" if asked == 1 else "s")

    async def _join_once(self) -> None:
        assert self.node is not None
        if self.joined and not self._rejoin:
            if self.peers() > 0:
                if not self._mode_decided and time.monotonic() >= self._next_probe:
                    # joined while no seed answered the probe (e.g. seeds still starting):
                    # keep asking, or a reachable box would stay a client for good
                    await self._decide_mode(await self._gather_seeds(), after_traffic=True)
                    self._probe_backoff = min(self._probe_backoff * 2, BACKOFF_MAX)
                    self._next_probe = time.monotonic() + self._probe_backoff
                return
            log.warning("dht: routing table is empty: rejoining")
            self.joined = False
            self.agent.status_changed()
        self._rejoin = False
        seeds = await self._gather_seeds()
        self._seed_count = len(seeds)
        if not seeds:
            # Nothing to dial; peers that contact us (we are a seed) still make us joined.
            self._unreachable = 0
            self._attempts += 1
            self._set_joined(self.peers() > 0, "(contacted by peers)")
            return
        if not self._mode_decided:
            await self._decide_mode(seeds)
        try:
            await asyncio.wait_for(self.node.bootstrap(seeds), timeout=JOIN_TIMEOUT)
        except TimeoutError:
            self._last_join_error = "bootstrap timed out"
        peers = self.peers()
        # bootstrap() pings every seed: with no contact afterwards, none of them answered
        self._unreachable = 0 if peers else len(seeds)
        self._attempts += 1     # counted once the outcome is known (readiness reads both)
        src = (f"{len(seeds)} seeds, {self._snapshot_seeds} from the routing snapshot"
               if self._snapshot_seeds else f"{len(seeds)} seeds")
        self._set_joined(peers > 0, f"via {src}")

    def _set_joined(self, joined: bool, how: str) -> None:
        if joined and not self._joined:
            self._joined_at = time.time()
            log.info("dht: joined %s, %d peers", how, self.peers())
            self.agent.status_changed()
        elif not joined and self._attempts in (1, 3, 10) and self._seed_count:
            log.warning("dht: not joined yet: %d of %d seeds unreachable (retrying)",
                        self._unreachable, self._seed_count)
        self._joined = joined

    async def _join_loop(self) -> None:
        backoff = BACKOFF_START
        assert self._wake is not None
        while True:
            try:
                await self._join_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # a failed join attempt is retried, never fatal
                self._last_join_error = str(exc)
                if self._attempts in (1, 3, 10):
                    log.warning("dht: join attempt failed: %s", exc)
            if self.joined:
                backoff = BACKOFF_START
                delay = MAINTAIN_INTERVAL if self._mode_decided else BACKOFF_START
            elif not self._seed_count:
                delay = MAINTAIN_INTERVAL / 2   # seedless: watch for inbound peers / snapshot
            else:
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, BACKOFF_MAX)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()

    # ------------------------------------------------------------------ API for others
    @property
    def joined(self) -> bool:
        """True once we have a peer. Read live: a seed that others contact becomes joined
        at once, not at the join loop's next tick."""
        if not self._joined and self.node is not None and self._attempts and self.peers():
            self._set_joined(True, "(contacted by peers)")
        return self._joined

    @joined.setter
    def joined(self, value: bool) -> None:
        self._joined = value

    def peers(self) -> int:
        if self.node is None:
            return 0
        p = self.node.peers()
        return p if isinstance(p, int) else len(p)

    async def announce(self, record: WorkerRecord) -> int:
        """Store ``record`` on the k closest nodes of each of its keys; nodes that stored."""
        if self.node is None:
            return 0
        self.counters.announces += 1
        if self.peers() == 0:
            # Not joined: the node would only keep a local copy nobody can find (it counts
            # that as a store); report 0 so the worker falls back to the coordinators.
            self.counters.announce_failures += 1
            return 0
        self._drop_thin_closest(record)
        try:
            stored = int(await self.node.announce(record) or 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("dht: announce failed: %s", exc)
            stored = 0
        if stored == 0:
            self.counters.announce_failures += 1
        return stored

    def _drop_thin_closest(self, record: WorkerRecord) -> None:
        """Forget cached closest-node sets that are thinner than the network now is.

        ``DHTNode`` caches each key's k closest nodes for ``closest_ttl`` (120 s). A set
        cached while the network was still small (a worker that joined among the first)
        holds only those few nodes, and every republish for two minutes went to them
        alone: the record sat on 2 nodes instead of k, and lookups whose crawl did not
        pass those nodes missed it (seen in the 22-agent test). A set smaller than
        min(k, contacts we know) is certainly stale; dropping it makes the announce crawl
        afresh.
        """
        if self.node is not None:
            want = min(self.agent.config.dht.ksize, self.peers())
            self.node.drop_thin_closest(record.keys(), want)

    async def find_providers(self, service: str, limit: int | None = None) -> list[WorkerRecord]:
        """Live (verified, not withdrawn) records for ``service``, newest seq per worker."""
        if self.node is None:
            return []
        self.counters.lookups += 1
        t0 = time.perf_counter()
        try:
            records = await self.node.find_providers(service, limit=limit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.lookup_errors += 1
            log.warning("dht: lookup of %r failed: %s", service, exc)
            records = []
        dt = time.perf_counter() - t0
        self.counters.note_lookup(dt)
        now = time.time()
        live = admitted(self.agent, [r for r in records
                                     if not r.withdrawn and r.expires_at > now])
        if live:
            self.counters.lookup_hits += 1
        return live

    async def service_counts(self) -> dict[str, int]:
        """Live workers per service over the network, from the sharded service index
        (``DHTNode.service_counts``); ``{}`` when not running or on failure."""
        if self.node is None:
            return {}
        try:
            return await self.node.service_counts()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.lookup_errors += 1
            log.warning("dht: service index lookup failed: %s", exc)
            return {}

    def contacts(self) -> list[tuple[str, str, int]]:
        return list(self.node.contacts()) if self.node is not None else []

    def routing_snapshot(self) -> list[tuple[str, int]]:
        return list(self.node.routing_snapshot()) if self.node is not None else []

    @property
    def storage(self) -> ProviderStorage | None:
        """The local record store (admission purges it, explain reads tombstones)."""
        return self.node.storage if self.node is not None else None

    def topology(self) -> Topology:
        """The routing table's buckets and contacts (the dashboard's ring)."""
        return self.node.topology() if self.node is not None else Topology(0, [])

    # ------------------------------------------------------------------ readiness/status
    def ready(self) -> tuple[bool, str]:
        cfg = self.agent.config
        if self.node is None:
            return False, "dht: not started"
        if self.joined:
            return True, ""
        if cfg.agent.role == "coordinator" and not cfg.dht.bootstrap:
            return True, ""            # first seed of an empty network
        if not cfg.dht.bootstrap and not self._snapshot_seeds:
            where = cfg.source or default_path()
            return False, f"dht: no bootstrap seeds configured — edit dht.bootstrap in {where}"
        if self._attempts == 0:
            return False, "dht: joining"
        return False, f"dht: joining, {self._unreachable} seeds unreachable"

    def status(self) -> str:
        frag = f"peers={self.peers()}"
        if self.mode == "client":
            frag += " (client)"
        return frag

    def stats(self) -> dict[str, Any]:
        node_stats: dict[str, Any] = {}
        if self.node is not None:
            try:
                node_stats = dict(self.node.stats())
            except Exception as exc:
                node_stats = {"error": str(exc)}
        c = self.counters
        out: dict[str, Any] = {
            "node_id": self.identity.node_id.hex() if self.identity is not None else None,
            "mode": self.mode,
            "mode_config": self.agent.config.dht.mode,
            "joined": self.joined,
            "joined_at": self._joined_at,
            "peers": self.peers(),
            "routing_table_size": node_stats.get("routing_table_size", self.peers()),
            "records_stored": node_stats.get("records_stored", node_stats.get("records", 0)),
            "seeds": {"resolved": self._seed_count, "from_snapshot": self._snapshot_seeds,
                      "unreachable": self._unreachable, "failures": self._seed_failures[:10],
                      "attempts": self._attempts},
            "lookups": {"total": c.lookups, "hits": c.lookup_hits,
                        "errors": c.lookup_errors,
                        "hit_rate": round(c.lookup_hits / c.lookups, 4) if c.lookups else None,
                        "p50_ms": c.percentile(0.5), "p99_ms": c.percentile(0.99)},
            "announces": {"total": c.announces, "failures": c.announce_failures},
        }
        for k, v in node_stats.items():
            out.setdefault(k, v)
        return out

    # ------------------------------------------------------------------ metrics
    def _register_metrics(self) -> None:
        registry = getattr(self.agent, "registry", None)
        if registry is None or self._collector is not None:
            return
        collector = self._collector = DHTCollector(self)
        try:
            registry.register(collector)
        except ValueError as exc:     # duplicated names must not stop the agent
            log.warning("dht: metrics not registered: %s", exc)
