"""Shared helpers for the discovery tests: real signed records, an agent around the
component, and a stand-in for the DHT component's ``find_providers`` interface."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.component import Component
from agent.config import AgentSection, Config, DHTSection, DiscoverySection
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.discovery.service import DiscoveryComponent
from agent.lifecycle import Agent


def make_record(ident: Identity | None = None, *, now: float | None = None,
                ttl: float = 300, **kw: Any) -> WorkerRecord:
    """A real signed record (defaults: an A100 in eu-west serving ocr)."""
    args: dict[str, Any] = dict(name="w", services=("ocr",), endpoint="http://127.0.0.1:9",
                                gpu="A100", gpu_memory_gb=80.0, load=0.0, capacity=4,
                                region="eu-west")
    args.update(kw)
    return WorkerRecord.create(ident or Identity.generate(), now=now, ttl=ttl, **args)


class Clock:
    """A settable wall clock (records are dated in wall time)."""

    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class ProviderStub(Component):
    """The DHT component's lookup interface (``find_providers``), answering from a dict.

    Used where a test is about discovery's own behaviour (cache, single-flight,
    fallback); ``calls`` counts the queries discovery made.
    """

    name = "dht"
    storage = None     # stores no records for the network (no tombstones to read)

    def __init__(self, agent: Agent, records: dict[str, list[WorkerRecord]] | None = None,
                 delay: float = 0.0, fail: bool = False) -> None:
        super().__init__(agent)
        self.records = records if records is not None else {}
        self.delay = delay
        self.fail = fail
        self.calls: list[str] = []
        self.cancelled = 0        # queries abandoned by the caller (its timeout)

    def add(self, rec: WorkerRecord) -> None:
        for key in (*rec.services, "*"):
            lst = [r for r in self.records.get(key, []) if r.worker_id != rec.worker_id]
            lst.append(rec)
            self.records[key] = lst

    async def find_providers(self, service: str, limit: int | None = None) -> list[WorkerRecord]:
        self.calls.append(service)
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail:
            raise OSError("network unreachable")
        return list(self.records.get(service, []))

    async def service_counts(self) -> dict[str, int]:
        """No service index: the service list falls back to the "*" answer."""
        return {}


# every state dir these helpers make is under one directory removed when the test process
# exits (a mkdtemp each left one directory in /tmp per test: thousands of them)
_STATE_ROOT = tempfile.TemporaryDirectory(prefix="rma-disc-")


def make_config(*, region: str = "", cache_ttl: int = 60, coordinators: Iterable[str] = (),
                republish: int = 30, state_dir: Path | None = None, **disc: Any) -> Config:
    return Config(
        agent=AgentSection(role="worker", name="test", region=region,
                           state_dir=state_dir or Path(tempfile.mkdtemp(dir=_STATE_ROOT.name))),
        dht=DHTSection(republish_interval=republish),
        discovery=dataclasses.replace(DiscoverySection(
            cache_ttl=cache_ttl, coordinators=tuple(coordinators),
            allow_private_hosts=("127.0.0.0/8", "::1")), **disc),
    )


def make_discovery(*, with_dht: bool = True, seed: int = 7, clock: Clock | None = None,
                   **cfg: Any) -> tuple[Agent, DiscoveryComponent, ProviderStub | None]:
    """An Agent holding [ProviderStub?, DiscoveryComponent] (not started)."""
    agent = Agent(make_config(**cfg), components=[])
    stub = ProviderStub(agent) if with_dht else None
    if stub is not None:
        agent.components.append(stub)
    comp = DiscoveryComponent(agent, rng=random.Random(seed), clock=clock or time.time)
    agent.components.append(comp)
    return agent, comp, stub
