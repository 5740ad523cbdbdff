"""The Agent's typed accessors return the component of that role, or None; and each
component offers every member its protocol in ``agent.interfaces`` promises.

CI runs no type checker, so a member renamed on a component but not in its protocol (or
the reverse) would only show as an AttributeError in whatever path reads it. This test
builds real agents from configs (nothing started, no socket opened) and checks each
protocol's members against the component instances.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import interfaces
from agent.config import AgentSection, Config
from agent.discovery.router_view import RouterView
from agent.lifecycle import Agent

# accessor -> (component name, protocol)
ACCESSORS: dict[str, tuple[str, type]] = {
    "dht": ("dht", interfaces.DHTService),
    "discovery": ("discovery", interfaces.DiscoveryService),
    "worker": ("worker", interfaces.WorkerService),
    "tunnel": ("tunnel", interfaces.TunnelService),
    "admission": ("network", interfaces.AdmissionService),
    "coordinator": ("coordinator", interfaces.RegistryService),
}


def _members(proto: type) -> set[str]:
    """What a protocol promises: its methods, properties and annotated attributes."""
    names = {n for n in vars(proto) if not n.startswith("_")}
    return names | set(getattr(proto, "__annotations__", {}))


def _agent(tmp_path: Path, role: str) -> Agent:
    return Agent(Config(agent=AgentSection(role=role, name=role, state_dir=tmp_path / role)))


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_each_accessor_is_its_component_or_none(tmp_path: Path, role: str) -> None:
    agent = _agent(tmp_path, role)
    by_name = {c.name: c for c in agent.components}
    for accessor, (name, _proto) in ACCESSORS.items():
        assert getattr(agent, accessor) is by_name.get(name), accessor
    # the role slot decides which of the two roles answers
    assert (agent.worker is None) == (role == "coordinator")
    assert (agent.coordinator is None) == (role == "worker")


def test_no_components_means_every_accessor_is_none(tmp_path: Path) -> None:
    agent = Agent(Config(agent=AgentSection(state_dir=tmp_path)), components=[])
    assert all(getattr(agent, accessor) is None for accessor in ACCESSORS)


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_components_offer_what_their_protocol_promises(tmp_path: Path, role: str) -> None:
    agent = _agent(tmp_path, role)
    missing = []
    for accessor, (_name, proto) in ACCESSORS.items():
        comp = getattr(agent, accessor)
        if comp is None:
            continue
        missing += [f"{accessor}.{m}" for m in sorted(_members(proto)) if not hasattr(comp, m)]
    missing += [f"agent.{m}" for m in sorted(_members(interfaces.AgentAPI))
                if not hasattr(agent, m)]
    disc = agent.discovery
    assert disc is not None
    view = RouterView(disc)
    missing += [f"router_view.{m}" for m in sorted(_members(interfaces.RouterDiscovery))
                if not hasattr(view, m)]
    assert missing == [], missing
    assert _members(interfaces.DHTService) >= {"identity", "find_providers", "topology"}
