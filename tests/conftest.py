"""Suite-wide hooks: the ``requires`` mark (see ``tests.util.requires``) and how the
suite is split over pytest-xdist workers.

``scripts/test.sh`` runs the suite on two xdist workers with ``--dist loadfile``: a test
file is the unit of work (its module-scoped clusters and containers are set up once, on
one worker). Most files own everything they use (ports from their worker's slice,
``tmp_path``, uniquely named namespaces), so they may run beside anything. The groups
below join files into one unit, run on one worker one after the other:

- ``appliance``: the ``.deb`` build writes ``dist/`` and the debootstrapped root
  filesystems are cached once per release; one worker builds them once and boots its
  containers one at a time.
- ``cpu-heavy``: the tests that run hundreds of in-process nodes or dozens of agent
  processes. Each is already a full load for one core; two at once would make each a test
  of the machine rather than of the agent.

The groups are handed out first: they are the longest units, and a worker left alone with
one at the end would double the suite's wall time.

(pytest-xdist's own ``--dist loadgroup`` is not used: with pytest 9 its group marks have
no effect, xdist 3.8 writes them to a node-id attribute pytest no longer reads.)
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


def pytest_runtest_setup(item: Any) -> None:
    for mark in item.iter_markers("requires"):
        require(mark.args[0] if mark.args else mark.kwargs.get("why_not"))


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


def work_unit_of(rootdir: Path, nodeid: str) -> str:
    """The unit of work a test belongs to: its group, or else its file."""
    file = nodeid.split("::", 1)[0]
    return xdist_group_of(rootdir / file) or file


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    """``--dist loadfile`` with the groups above as single units, handed out first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    rootdir = Path(str(config.rootpath))
    groups = [group for _, group in _GROUPS]

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(rootdir, nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            for group in reversed(groups):
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return GroupedFiles(config, log)
