"""The fleet's versions: records carry agent_version, agents count their peers' versions,
``rma-agent status`` warns when most peers run a newer one (agent/versions.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent import __version__
from agent.cli.status import format_status, outdated_warning
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord
from agent.versions import VersionsComponent, summarize, version_key
from tests.cluster import REPO, Cluster
from tests.util import wait_for


def rec(ident: Identity, version: str, *, seq: int | None = None, ttl: float = 60,
        withdrawn: bool = False, now: float | None = None) -> WorkerRecord:
    return WorkerRecord.create(ident, name="w", services=("ocr",), endpoint="http://127.0.0.1:9",
                               gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1, region="x",
                               seq=seq, ttl=ttl, withdrawn=withdrawn, agent_version=version,
                               now=now)


class FakeAgent:
    """Only what VersionsComponent uses: subscribe() and dht.identity."""

    def __init__(self, own: Identity) -> None:
        self.subs: dict[str, list] = {}
        self.dht = type("D", (), {"identity": own})()

    def subscribe(self, event: str, cb) -> None:
        self.subs.setdefault(event, []).append(cb)


def test_version_key_orders_release_numbers():
    assert version_key("0.2.0") < version_key("0.10.0") < version_key("1.0")
    assert version_key("") < version_key("0.1")
    assert version_key("0.3.0rc1") == version_key("0.3.0")   # next to its release
    assert version_key("garbage") == ()


def test_summarize_outdated_needs_a_strict_majority_of_newer_peers():
    assert summarize("0.2.0", {})["outdated"] is False
    s = summarize("0.2.0", {"0.3.0": 2, "0.2.0": 2})
    assert (s["newer"], s["sampled"], s["outdated"]) == (2, 4, False)
    s = summarize("0.2.0", {"0.3.0": 2, "0.2.0": 1, "": 1, "0.1.0": 0})
    assert (s["newer"], s["outdated"]) == (2, False)
    s = summarize("0.2.0", {"0.3.0": 3, "0.2.0": 1, "": 1})
    assert (s["newer"], s["sampled"], s["outdated"]) == (3, 5, True)
    assert list(s["peers"]) == ["", "0.2.0", "0.3.0"]          # oldest first


async def test_component_counts_each_live_worker_once_with_its_newest_record():
    own = Identity.generate()
    agent = FakeAgent(own)
    clock = [time.time()]
    comp = VersionsComponent(agent, clock=lambda: clock[0])  # type: ignore[arg-type]
    await comp.start()
    emit = agent.subs["record"][0]
    a, b, c, gone = (Identity.generate() for _ in range(4))
    emit(rec(a, "0.2.0", seq=1))
    emit(rec(a, "0.3.0", seq=2))               # a upgraded: counted once, as 0.3.0
    emit(rec(a, "0.2.0", seq=1))               # an older copy arriving late changes nothing
    emit(rec(b, "0.3.0", ttl=5))
    emit(rec(c, ""))                           # a v1 record names no version
    emit(rec(own, "9.9.9"))                    # our own record is not a peer
    emit(rec(gone, "0.3.0", seq=5))
    emit(rec(gone, "0.3.0", seq=6, withdrawn=True))   # withdrawn: no longer in the fleet
    emit(object())                             # never raises inside the storage path
    assert comp.peers() == {"0.3.0": 2, "": 1}
    st = comp.stats()["versions"]
    assert st["local"] == __version__ and st["sampled"] == 3
    if version_key(__version__) < version_key("0.3.0"):
        assert st["outdated"] and "OUTDATED: 2 of 3" in comp.status()
    clock[0] += 10                             # b's record expired
    assert comp.peers() == {"0.3.0": 1, "": 1}


def test_status_shows_fleet_versions_and_warns_when_outdated():
    stats = {"name": "w", "version": "0.2.0",
             "versions": summarize("0.2.0", {"0.3.0": 3, "0.2.0": 1})}
    text = format_status(stats)
    assert "fleet versions" in text and "0.2.0 x1, 0.3.0 x3 (4 peers)" in text
    warning = outdated_warning(stats)
    assert warning is not None
    assert "runs 0.2.0, older than 3 of the 4 peers it sees (0.3.0 x3)" in warning
    assert outdated_warning({"versions": summarize("0.3.0", {"0.3.0": 3})}) is None
    assert outdated_warning({}) is None and outdated_warning({"versions": "x"}) is None


def _as_version(version: str) -> tuple[str, ...]:
    """The launcher (``Cluster.start``) of an agent that believes it is ``version``: the
    same code, only agent.__version__ differs, as in a fleet where some boxes upgraded
    first."""
    return ("-c", f"import agent, runpy; agent.__version__ = {version!r}; "
            "runpy.run_module('agent', run_name='__main__')")


@pytest.mark.slow
def test_real_fleet_versions_reach_the_coordinator_and_status_warns(tmp_path):
    """A coordinator at this version, two workers one minor version ahead and one at this
    version: the records carry agent_version, the coordinator counts 3 peers of which 2
    are newer -> outdated, and `rma-agent status` (a real process) warns on stderr."""
    major, minor = version_key(__version__)[:2]
    ahead = f"{major}.{minor + 1}.0"
    with Cluster(tmp_path, record_ttl=30, republish=2) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        new1 = cl.worker("new1", seeds=[c1.dht_addr])
        new2 = cl.worker("new2", seeds=[c1.dht_addr])
        same = cl.worker("same", seeds=[c1.dht_addr])
        cl.start(new1, new2, launcher=_as_version(ahead))
        cl.start(same)
        cl.wait_ready(new1, new2, same)
        records = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(
            c1.provider_records("ocr")[0]), 30, 0.3, "three records on the coordinator")
        assert sorted(r["agent_version"] for r in records) == sorted([ahead, ahead, __version__])

        def versions():
            status, stats = c1.get("/api/dht/stats")
            assert status == 200
            v = stats["versions"]
            return v if v["sampled"] == 3 else None

        v = wait_for(versions, 30, 0.3, "the coordinator's census of three workers")
        assert v["local"] == __version__
        assert v["peers"] == {__version__: 1, ahead: 2}
        assert v["newer"] == 2 and v["outdated"] is True
        r = subprocess.run([sys.executable, "-m", "agent", "status", "--url", c1.url],
                           capture_output=True, text=True, timeout=30, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        assert f"{__version__} x1, {ahead} x2 (3 peers)" in r.stdout, r.stdout
        assert f"older than 2 of the 3 peers it sees ({ahead} x2)" in r.stderr, r.stderr
        # A newer worker sees no reason to warn about itself.
        status, stats = new1.get("/api/dht/stats")
        assert status == 200 and stats["version"] == ahead
        assert stats["versions"]["outdated"] is False


async def test_a_worker_gone_without_goodbye_leaves_the_sample_when_it_turns_stale():
    """Counted until its record expires *or* turns stale by its own ``refresh`` (what
    lookups offer): a killed worker stayed in the fleet's versions for its whole TTL."""
    own = Identity.generate()
    agent = FakeAgent(own)
    clock = [time.time()]
    comp = VersionsComponent(agent, clock=lambda: clock[0])  # type: ignore[arg-type]
    await comp.start()
    emit = agent.subs["record"][0]
    quick, slow = Identity.generate(), Identity.generate()
    for ident, refresh in ((quick, 10.0), (slow, 60.0)):
        emit(WorkerRecord.create(ident, name="w", services=("ocr",), endpoint="http://127.0.0.1:9",
                                 gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=1,
                                 region="x", ttl=300, refresh=refresh, agent_version="0.2.0",
                                 now=clock[0]))
    assert comp.peers() == {"0.2.0": 2}
    clock[0] += 30                              # quick missed two of its 10 s refreshes
    assert comp.peers() == {"0.2.0": 1}
