"""The suite's split over pytest-xdist workers: each worker's ports are its own, and the
groups of tests/conftest.py name files that exist (a renamed file must not silently leave
its group and start sharing a machine-wide resource with another worker)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import conftest, util

TESTS = Path(__file__).resolve().parent


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_every_group_names_an_existing_path() -> None:
    for prefix, _group in conftest._GROUPS:
        assert (TESTS / prefix).exists(), f"tests/conftest.py groups {prefix}, which is gone"


def test_grouped_files_get_their_group_and_others_none() -> None:
    assert conftest.xdist_group_of(TESTS / "appliance" / "test_deb.py") == "appliance"
    assert conftest.xdist_group_of(TESTS / "dht" / "test_scale.py") == "cpu-heavy"
    assert conftest.xdist_group_of(TESTS / "dht" / "test_scale_more.py") is None
    assert conftest.xdist_group_of(TESTS / "test_suite_split.py") is None


def test_a_group_is_one_unit_of_work_and_any_other_file_its_own() -> None:
    root = TESTS.parent
    unit = conftest.work_unit_of
    assert unit(root, "tests/appliance/test_deb.py::test_layout[bookworm]") == "appliance"
    assert unit(root, "tests/appliance/test_nspawn.py::test_x") == "appliance"
    assert unit(root, "tests/test_network.py::test_metrics") == "cpu-heavy"
    assert unit(root, "tests/dht/test_scale.py::test_y") == "cpu-heavy"
    assert unit(root, "tests/dht/test_cluster.py::test_z[a::b]") == "tests/dht/test_cluster.py"


@pytest.mark.parametrize("worker", [0, 1])
def test_two_workers_draw_from_disjoint_slices_below_the_ephemeral_range(
        monkeypatch: pytest.MonkeyPatch, worker: int) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(util, "_handed_out", set())
    mine = util._port_slice()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{1 - worker}")
    other = util._port_slice()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
    assert not set(mine) & set(other)
    assert mine.stop <= _ephemeral_low() or mine.stop <= util._PORTS_FROM + 2_000
    got = [util.free_port() for _ in range(50)] + [util.free_udp_tcp_port() for _ in range(20)]
    assert all(p in mine for p in got)
    assert len(set(got)) == len(got), "a port was handed out twice"


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(util, "_handed_out", set())
    held: list[socket.socket] = []
    try:
        # hold seven ports of this worker's slice and make the draw come from them plus one
        for port in util._port_slice():
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == 8:
                break
        last = held.pop()
        free = last.getsockname()[1]
        last.close()
        window = [s.getsockname()[1] for s in held] + [free]
        monkeypatch.setattr(util, "_port_slice", lambda: window)
        assert util.free_port() == free
        with pytest.raises(RuntimeError, match="no free port"):
            util.free_port()     # the rest are bound, and the free one was handed out
    finally:
        for s in held:
            s.close()


def test_hostile_tests_of_two_workers_use_different_loopback_nets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.dht.hostile import free_net

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    drawn = {}
    for worker in (0, 1):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        drawn[worker] = {free_net() for _ in range(300)}
    assert not drawn[0] & drawn[1]
    assert all(20 <= n <= 60 for n in drawn[0] | drawn[1])   # below the clusters' 64-250
