"""A minimal Agent and DHT stand-in so the roles can be tested in process.

The fake DHT keeps what was announced (newest seq per worker, like real storage), and can
be told to store on zero nodes — the case that makes a worker fall back to coordinators.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.component import ComponentDirectory
from agent.config import (
    AgentSection,
    Config,
    DHTSection,
    DiscoverySection,
    TunnelSection,
    WorkerSection,
)
from agent.dht.identity import Identity
from agent.dht.record import ALL_SERVICES, WorkerRecord


class FakeDHT:
    name = "dht"
    storage = None     # stores no records for the network (no tombstones to read)

    def __init__(self, identity: Identity, stores_on: int = 3) -> None:
        self.identity = identity
        self.stores_on = stores_on
        self.joined = True
        self.announced: list[WorkerRecord] = []
        self.by_worker: dict[bytes, WorkerRecord] = {}
        self._contacts: list[tuple[str, str, int]] = []

    async def announce(self, record: WorkerRecord) -> int:
        record.verify(time.time())
        self.announced.append(record)
        if self.stores_on:
            old = self.by_worker.get(record.worker_id)
            if old is None or old.seq < record.seq:
                self.by_worker[record.worker_id] = record
        return self.stores_on

    async def find_providers(self, service: str, limit: int | None = None) -> list[WorkerRecord]:
        return [r for r in self.by_worker.values() if not r.withdrawn
                and (service == ALL_SERVICES or service in r.services)]

    def contacts(self) -> list[tuple[str, str, int]]:
        return list(self._contacts)

    def peers(self) -> int:
        return len(self._contacts)

    def ready(self) -> tuple[bool, str]:
        return True, ""


class FakeAgent(ComponentDirectory):
    """The Agent's bus, config and registry, and its typed accessors over ``components``."""

    def __init__(self, config: Config, dht: FakeDHT | None = None) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.components: list[Any] = [dht] if dht is not None else []
        self._subs: dict[str, list[Callable[[Any], Any]]] = defaultdict(list)
        self.status_changes = 0

    def subscribe(self, event: str, cb: Callable[[Any], Any]) -> None:
        self._subs[event].append(cb)

    def emit(self, event: str, value: Any) -> None:
        for cb in self._subs[event]:
            cb(value)

    def status_changed(self) -> None:
        self.status_changes += 1


def make_config(tmp: Path, role: str = "worker", **sections: dict[str, Any]) -> Config:
    """A Config built from the dataclasses (no file), with small timings for tests."""
    parts: dict[str, Any] = {
        "agent": AgentSection(role=role, name=f"test-{role}", region="eu",
                              state_dir=tmp / "state"),
        "dht": DHTSection(record_ttl=20, republish_interval=1),
        "worker": WorkerSection(services=("ocr", "asr"), endpoint="https://w.example.org",
                                max_concurrency=4, gpu="A100", gpu_memory_gb=80.0),
        "tunnel": TunnelSection(mode="off"),
        "discovery": DiscoverySection(allow_private_hosts=("127.0.0.0/8", "::1")),
    }
    for name, values in sections.items():
        parts[name] = dataclasses.replace(parts[name], **values)
    return Config(**parts)
