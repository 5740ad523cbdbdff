"""Hostile peers between real hosts (network namespaces, root only), production defaults.

No loopback knob here: every agent runs in its own namespace on 10.77.0.x with the
default diversity policy. One more host runs the attacker (``tests/dht/hostile.py``): 20
UDP ports claiming the 20 ids closest to ``ocr``, answering every query with nothing,
pinging every agent every 2 s so that it gets (re)verified, and forging ``announce``
datagrams whose source is a real worker's address. Every agent must still find every
honest worker in ≥ 99 % of lookups, hold at most the per-IP limit of attacker contacts, and
store none of the forged records.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cluster import REPO, Cluster
from tests.netns import netlab
from tests.util import requires, wait_for

# in CI (.ci/run installs ip and nft, as root) a missing lab is a failure, never a skip
pytestmark = [pytest.mark.slow, requires(netlab.available())]

WORKERS = 4
ROUNDS = 10


def test_eclipse_and_spoofed_announces_between_real_hosts(tmp_path) -> None:
    with netlab.NetLab() as lab, Cluster(tmp_path, record_ttl=30, republish=3) as cl:
        names = ["coord", *[f"w{i}" for i in range(WORKERS)], "evil"]
        hosts = {name: lab.add_public(name) for name in names}

        def place(name: str) -> dict[str, object]:
            return {"ip": hosts[name], "exec_prefix": lab.exec_argv(name)}

        coord = cl.coordinator("coord", **place("coord"))
        cl.start(coord)
        cl.wait_ready(coord)
        targets = ",".join(f"{hosts[n]}:8468" for n in names[:-1])
        env = dict(os.environ, PYTHONPATH=str(REPO))
        evil = lab.popen("evil", sys.executable, "-m", "tests.dht.hostile", "eclipse",
                         "--ip", hosts["evil"], "--targets", targets, "--seconds", "90",
                         "--spoof-as", f"{hosts['w0']}:8468", cwd=str(REPO), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert evil.stdout is not None and evil.stdout.readline().strip() == "ready"
            workers = [cl.worker(f"w{i}", [coord.dht_addr], mode="server", **place(f"w{i}"))
                       for i in range(WORKERS)]
            cl.start(*workers)
            cl.wait_ready(*workers)
            agents = [coord, *workers]
            honest = {w.name for w in workers}
            wait_for(lambda: all(honest <= a.providers("ocr")[0] for a in agents), 30,
                     what="every agent finds every honest worker")
            found = total = 0
            for _ in range(ROUNDS):
                for a in agents:
                    names_found = a.providers("ocr")[0]
                    total += 1
                    found += honest <= names_found
                    assert "spoofed" not in names_found
            share = found / total
            evil_contacts: dict[str, int] = {}

            def attacker_in_a_table() -> bool:
                for a in agents:
                    topo = a.get("/api/dht/topology")[1]
                    evil_contacts[a.name] = sum(1 for n in topo["nodes"]
                                                if n.get("ip") == hosts["evil"])
                return any(evil_contacts.values())
            # the attacker answers identify like any node, so some table takes it in once
            # verified; on a loaded machine that can come after the lookup rounds
            wait_for(attacker_in_a_table, 30, interval=0.5,
                     what="the attacker in some agent's table (else the test proves nothing)")
            drops = {a.name: a.get("/api/dht/stats")[1]["drops"] for a in agents}
            print({"found_share": share, "lookups": total, "evil_contacts": evil_contacts,
                   "announce_no_token": {k: v.get("announce_no_token", 0)
                                         for k, v in drops.items()}})
            assert share >= 0.99, share
            assert max(evil_contacts.values()) <= 5, evil_contacts
            assert sum(1 for v in evil_contacts.values() if v > 0) >= 1, \
                "the attacker never got into any table: the test would prove nothing"
            # every agent the forgeries reach drops them (no write token). Not w0: they
            # carry w0's own address as source, and w0's kernel discards a datagram from
            # outside claiming a local source address (checked with two namespaces and a
            # raw socket) before the agent sees it. w0's count was > 0 only by chance (an
            # honest announce before its token), which failed 2 of 5 loaded runs.
            forged_at = {k: v.get("announce_no_token", 0) for k, v in drops.items()
                         if k != "w0"}
            assert all(n > 0 for n in forged_at.values()), drops
        finally:
            evil.kill()
            # read through the text wrapper: readline() above may have buffered more lines
            out = evil.stdout.read() if evil.stdout is not None else ""
            evil.wait(timeout=5)
        spoofed = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                   if line.startswith("introduced")]
        assert spoofed and spoofed[-1] > 0, out     # forged announces were really sent
