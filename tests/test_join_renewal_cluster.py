"""A closed network on loopback: ``rma-agent join --token`` enrolls a worker, whose
certificate (a few seconds long here) then renews itself while lookups run.

Real processes: coordinator c1 (issuer certificate for its own key, limited to
``LIFETIME`` seconds per worker certificate; enrollment tokens from ``rma-agent token
create``), an observer agent c2 (closed network: it only offers admitted workers) and
the worker, configured by ``rma-agent join`` and started from that config. Then:

1. several renewals pass while c2 looks the service up all along (no cache): it never
   misses the worker -- each new certificate is announced before the old one expires;
2. c1 (the only issuer) is stopped during a renewal attempt: the worker retries with
   back-off, warns, and renews once c1 is back;
3. c1 revokes the worker: its renewal is refused and the journal says so.

The same run as a soak (the issue's target: minutes-long certificates, 30 minutes of
renewals, no lookup missing the worker), printing its figures as JSON::

    RMA_JOIN_CERT_S=180 RMA_JOIN_SOAK_S=1800 .venv/bin/python -m pytest -s \\
        tests/test_join_renewal_cluster.py
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey, b64_key
from agent.admission.revocation import RevocationList
from agent.cli import join_config
from agent.dht.identity import Identity
from tests.cluster import AgentProcess, Cluster, die_with_parent, join_argv, join_ports
from tests.util import REPO, agent_env, free_port, wait_for

pytestmark = pytest.mark.slow

LIFETIME = int(os.environ.get("RMA_JOIN_CERT_S", "6"))   # renewal every 2/3 of it
SOAK_S = float(os.environ.get("RMA_JOIN_SOAK_S", "0"))    # phase 1 at least this long


def _renewal(worker_url: str) -> dict:
    from tests.util import http
    status, stats = http("GET", worker_url + "/api/dht/stats", timeout=3)
    assert status == 200, stats
    return stats["worker"]["certificate_renewal"] or {}


class Lookups(threading.Thread):
    """Looks ``service`` up from ``node`` until stopped (bounded); counts misses."""

    def __init__(self, node, service: str, worker: str, limit: int = 2000) -> None:
        super().__init__(daemon=True)
        self.node, self.service, self.worker, self.limit = node, service, worker, limit
        self.done = threading.Event()
        self.total = self.missed = 0
        self.errors: list[str] = []     # lookups that got no answer at all (not misses)

    def run(self) -> None:
        while not self.done.is_set() and self.total < self.limit:
            try:
                names, _, _ = self.node.providers(self.service)
            except AssertionError as exc:        # no 200 answer (an overloaded machine)
                self.errors.append(str(exc)[:200])
                self.done.wait(0.5)
                continue
            self.total += 1
            self.missed += self.worker not in names
            self.done.wait(0.1)


def test_enrolled_worker_renews_under_lookups_survives_a_down_coordinator_and_revocation(
        tmp_path):
    netkey = NetworkKey.generate()
    netpub = b64_key(netkey.public_key)
    upstream_port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "http.server", str(upstream_port), "--bind",
                           "127.0.0.1", "--directory", str(tmp_path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=die_with_parent)
    closed = {"network": {"admission_keys": [netpub]}}
    with Cluster(tmp_path / "cl", record_ttl=60, republish=5) as cl:
        c1 = cl.coordinator("c1", extra=closed)
        ident = Identity.load_or_create(c1.state_dir)
        issuer = IssuerCertificate.issue(netkey, ident.public_key, name="c1",
                                         max_cert_days=LIFETIME / 86400)
        (tmp_path / "c1.issuer").write_text(base64.b64encode(issuer.encode()).decode() + "\n")
        c1.data["network"]["issuer_cert"] = str(tmp_path / "c1.issuer")
        cl.start(c1)
        cl.wait_ready(c1)
        c2 = cl.coordinator("c2", seeds=[c1.dht_addr], extra=closed)
        cl.start(c2)
        token = subprocess.run([sys.executable, "-m", "agent", "token", "create", "-c",
                                str(c1.cfg_path), "--services", "ocr", "--name", "batch-1"],
                               cwd=REPO, env=agent_env(), capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()

        ports = join_ports()
        wdir = tmp_path / "w1"
        argv = join_argv(c1.gateway_url, wdir, ports, f"ocr=http://127.0.0.1:{upstream_port}",
                         "w1", "--token", token, "--timeout", "0")
        no_token = [a for a in argv if a not in ("--token", token)]
        r = subprocess.run(no_token, cwd=REPO, env=agent_env(), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "is closed" in r.stderr, r.stdout + r.stderr
        assert not (wdir / "agent.toml").exists()
        r = subprocess.run(argv, cwd=REPO, env=agent_env(), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "enrolled: certificate until" in r.stdout, r.stdout
        assert join_config.ownership(wdir / "agent.toml") == "ours"
        worker = AgentProcess(wdir / "agent.toml", wdir / "agent.log")
        wurl = f"http://127.0.0.1:{ports['http']}"
        lookups = Lookups(c2, "ocr", "w1", limit=max(2000, int(SOAK_S * 20)))
        try:
            cl.wait_ready(c2)
            wait_for(lambda: "w1" in c2.providers("ocr")[0], 30, what="w1 found from c2")
            # 1. renewals while lookups run all along
            lookups.start()
            first = _renewal(wurl).get("renewals", 0)
            t0 = time.monotonic()
            wait_for(lambda: _renewal(wurl).get("renewals", 0) >= first + 3
                     and time.monotonic() - t0 >= SOAK_S, 40 + SOAK_S + 3 * LIFETIME,
                     interval=0.5, what="three renewals (and the soak's duration)")
            soak = {"lifetime_s": LIFETIME, "seconds": round(time.monotonic() - t0, 1),
                    "renewals": _renewal(wurl)["renewals"] - first,
                    "renewal_failures": _renewal(wurl)["failures_total"]}
            lookups.done.set()
            lookups.join(10)
            soak.update(lookups=lookups.total, missed=lookups.missed,
                        unanswered=len(lookups.errors))
            print("\nrenewal soak:", json.dumps(soak))
            assert lookups.total >= 20 and lookups.missed == 0, soak
            assert len(lookups.errors) <= lookups.total // 10, lookups.errors[:3]
            # the worker reran join: nothing changes, no second enrollment (the token was
            # single-use: enrolling again would be refused)
            again = subprocess.run(argv, cwd=REPO, env=agent_env(), capture_output=True,
                                   text=True, timeout=60)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "still valid: not enrolling again" in again.stdout
            assert "config " + str(wdir / "agent.toml") + ": unchanged" in again.stdout

            # 2. the coordinator is down during an attempt, then back
            cl.stop(c1)
            wait_for(lambda: _renewal(wurl).get("failures", 0) >= 1, 20 + LIFETIME,
                     what="a failed renewal while c1 is down")
            renewed = _renewal(wurl)["renewals"]
            cl.start(c1)
            wait_for(lambda: _renewal(wurl).get("renewals", 0) > renewed, 30 + LIFETIME / 5,
                     what="renewal once c1 is back")
            assert _renewal(wurl)["failures"] == 0

            # 3. revoked: renewal refused, and said in the journal
            wkey = Identity.load_or_create(wdir / "state").public_key
            rl = RevocationList.issue(netkey, [wkey])
            (c1.state_dir / "revocations.list").write_text(
                base64.b64encode(rl.encode()).decode() + "\n")
            wait_for(lambda: "revoked" in _renewal(wurl).get("last_error", ""), 30 + LIFETIME,
                     what="the revoked worker's renewal refused")
            text = (wdir / "agent.log").read_text(errors="replace")
            assert "renewal failed" in text and "revoked" in text, text[-2000:]
        finally:
            lookups.done.set()
            worker.stop()
            up.terminate()
            up.wait(timeout=10)
