"""Suite-wide hooks: the ``requires`` mark (see ``tests.util.requires``) and the groups
that keep tests sharing one machine-wide resource on one pytest-xdist worker.

``scripts/test.sh`` runs the suite on two xdist workers with ``--dist loadgroup``. Most
tests own everything they use (ports from their worker's slice, ``tmp_path``, uniquely
named namespaces), so they may run beside anything. The groups below may not:

- ``appliance``: the ``.deb`` build writes ``dist/`` and the debootstrapped root
  filesystems are cached once per release; two workers would build them into the same
  place at the same time.
- ``cpu-heavy``: the tests that run hundreds of in-process nodes or dozens of agent
  processes. Each is already a full load for one core; two at once would make each a test
  of the machine rather than of the agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.util import require

_TESTS = Path(__file__).resolve().parent

# (path under tests/, group): a directory takes all its files, a file all its tests.
_GROUPS: tuple[tuple[str, str], ...] = (
    ("appliance", "appliance"),
    ("dht/test_scale.py", "cpu-heavy"),
    ("dht/test_cluster_scale.py", "cpu-heavy"),
    ("netns/test_wan.py", "cpu-heavy"),
    ("test_network.py", "cpu-heavy"),
)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "requires(why_not): skip when why_not is set, but fail in CI (tests.util)")


def xdist_group_of(path: Path) -> str | None:
    """The group of the test file at ``path``, or None when it may run anywhere."""
    try:
        rel = path.resolve().relative_to(_TESTS).as_posix()
    except ValueError:
        return None
    for prefix, group in _GROUPS:
        if rel == prefix or rel.startswith(prefix + "/"):
            return group
    return None


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        group = xdist_group_of(Path(str(item.path)))
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item: Any) -> None:
    for mark in item.iter_markers("requires"):
        require(mark.args[0] if mark.args else mark.kwargs.get("why_not"))
