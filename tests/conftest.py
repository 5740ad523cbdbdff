"""Suite-wide hooks: the ``requires`` mark (see ``tests.util.requires``)."""

from __future__ import annotations

from typing import Any

from tests.util import require


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "requires(why_not): skip when why_not is set, but fail in CI (tests.util)")


def pytest_runtest_setup(item: Any) -> None:
    for mark in item.iter_markers("requires"):
        require(mark.args[0] if mark.args else mark.kwargs.get("why_not"))
