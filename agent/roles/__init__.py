"""The two roles an agent can play (SPEC §1): a GPU ``worker`` or a stable ``coordinator``.

``role_component(agent)`` picks the component for ``agent.role``, so the lifecycle needs
no knowledge of what each role does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.component import Component
    from agent.lifecycle import Agent


def role_component(agent: Agent) -> Component:
    """The component for ``agent.config.agent.role`` ("worker" or "coordinator")."""
    role = agent.config.agent.role
    if role == "coordinator":
        from agent.roles.coordinator import CoordinatorRole

        return CoordinatorRole(agent)
    if role == "worker":
        from agent.roles.worker import WorkerRole

        return WorkerRole(agent)
    raise ValueError(f"agent.role must be 'worker' or 'coordinator', not {role!r}")
