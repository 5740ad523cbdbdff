"""The worker's certificate renewal client (agent/admission/renewal.py), in process.

A stub coordinator on loopback speaks the real protocol (``agent.admission.enrollment``:
requests parsed and their signatures checked, certificates issued by a real issuer
certificate with ``Certificate.issue_by``), with certificates of a few seconds. The
renewer must renew at a third of the lifetime left, several times in a row, each new
certificate on disk and installed; keep retrying (with back-off) while the coordinator
is down and succeed once it is back; and, refused (a revoked key), keep the old
certificate and warn in the log. The same with a real coordinator and worker processes
is tests/test_join_renewal_cluster.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from agent.admission.certificate import Certificate
from agent.admission.enrollment import (
    ENROLL_PATH,
    RenewRequest,
    build_response,
    parse_request,
    problem,
)
from agent.admission.issuer import IssuerCertificate
from agent.admission.keys import NetworkKey
from agent.admission.renewal import CertRenewer, backoff
from agent.dht.identity import Identity
from tests.util import free_port, wait_for_async

LIFETIME = 3.0


class StubCoordinator:
    """Renews certificates of a few seconds; can be refusing or down."""

    def __init__(self) -> None:
        self.netkey = NetworkKey.generate()
        self.ident = Identity.generate()
        self.issuer = IssuerCertificate.issue(self.netkey, self.ident.public_key,
                                              name="coord", max_cert_days=LIFETIME / 86400)
        self.revoked: set[bytes] = set()
        self.renewed = 0
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def issue(self, subject: bytes) -> Certificate:
        return Certificate.issue_by(self.ident, self.issuer, subject, name="w",
                                    services=("ocr",), lifetime=LIFETIME)

    async def handle(self, request: web.Request) -> web.Response:
        req = parse_request(await request.json())
        assert isinstance(req, RenewRequest)
        why = problem(req)
        if why is None and req.public_key in self.revoked:
            why = "this worker key is revoked"
        if why is not None:
            return web.json_response({"error": why}, status=403)
        self.renewed += 1
        return web.json_response(build_response(self.issue(req.public_key),
                                                [self.netkey.public_key]))

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post(ENROLL_PATH, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _renewer(coord: StubCoordinator, path: Path, worker: Identity, installed: list[bytes]
             ) -> CertRenewer:
    path.write_text(base64.b64encode(coord.issue(worker.public_key).encode()).decode() + "\n")
    return CertRenewer(cert_path=path, identity=worker, sources=lambda: [coord.url],
                       network_keys=lambda: (coord.netkey.public_key,),
                       install=lambda: installed.append(path.read_bytes()))


@contextlib.asynccontextmanager
async def _running(r: CertRenewer, coord: StubCoordinator) -> AsyncIterator[None]:
    """``r`` renewing in a task for the block; then the task cancelled, the stub down."""
    task = asyncio.create_task(r.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await coord.down()


def _cert(path: Path) -> Certificate:
    return Certificate.decode(base64.b64decode(path.read_text().strip()))


def test_backoff_doubles_is_capped_by_the_lifetime_and_jittered():
    lifetime = 7 * 86400.0
    full = [backoff(n, lifetime, rng=lambda: 1.0) for n in range(1, 12)]
    assert full[1] == 2 * full[0] and full[-1] == 600.0          # doubling, then 10 min cap
    assert backoff(1, lifetime, rng=lambda: 0.0) == full[0] / 2  # equal jitter: half fixed
    assert full[0] == 30.0
    assert max(backoff(n, 10.0, rng=lambda: 1.0) for n in range(1, 20)) == 1.0   # lifetime/10


def test_renews_several_times_in_a_row_at_a_third_of_the_lifetime_left(tmp_path):
    async def scenario() -> None:
        coord = StubCoordinator()
        await coord.up()
        worker = Identity.generate()
        installed: list[bytes] = []
        r = _renewer(coord, tmp_path / "admission.cert", worker, installed)
        first = _cert(r.cert_path)
        async with _running(r, coord):
            await wait_for_async(lambda: len(installed) >= 3, timeout=20,
                                 what="three renewals")
            # each renewal happened with at most ~a third of its predecessor's life left
            # (never after expiry), and each new certificate is on disk and installed
            assert r.state.renewals >= 3 and r.state.failures_total == 0
            last = _cert(r.cert_path)
            assert last.subject == worker.public_key and last.not_after > first.not_after
            assert r.state.not_after == last.not_after and r.state.state == "waiting"
            assert coord.renewed == r.state.renewals

    asyncio.run(scenario())


def test_coordinator_down_during_an_attempt_then_back(tmp_path, caplog):
    async def scenario() -> None:
        coord = StubCoordinator()           # not up yet: the first attempts find nobody
        worker = Identity.generate()
        installed: list[bytes] = []
        r = _renewer(coord, tmp_path / "admission.cert", worker, installed)
        async with _running(r, coord):
            await wait_for_async(lambda: r.state.failures >= 2, timeout=10,
                                 what="failed attempts while the coordinator is down")
            assert r.state.state == "failing" and "no answer" in r.state.last_error
            assert not installed
            await coord.up()
            await wait_for_async(lambda: installed, timeout=10, what="renewal once back")
            assert r.state.failures == 0 and r.state.renewals == 1
            assert _cert(r.cert_path).not_after > time.time()

    with caplog.at_level(logging.WARNING, logger="rma_agent.network"):
        asyncio.run(scenario())
    assert any("renewal failed" in m for m in caplog.messages), caplog.messages


def test_revoked_worker_is_refused_keeps_its_certificate_and_warns(tmp_path, caplog):
    async def scenario() -> None:
        coord = StubCoordinator()
        await coord.up()
        worker = Identity.generate()
        coord.revoked.add(worker.public_key)
        installed: list[bytes] = []
        r = _renewer(coord, tmp_path / "admission.cert", worker, installed)
        before = r.cert_path.read_bytes()
        async with _running(r, coord):
            await wait_for_async(lambda: r.state.failures >= 2, timeout=10,
                                 what="refused renewals")
            assert "revoked" in r.state.last_error and "403" in r.state.last_error
            assert r.state.by_result.get("http_403", 0) >= 2
            assert not installed and r.cert_path.read_bytes() == before
            assert coord.renewed == 0

    with caplog.at_level(logging.WARNING, logger="rma_agent.network"):
        asyncio.run(scenario())
    assert any("renewal failed" in m and "revoked" in m for m in caplog.messages), \
        caplog.messages


def test_no_coordinator_to_renew_from_is_said(tmp_path):
    r = _renewer(StubCoordinator(), tmp_path / "admission.cert", Identity.generate(), [])
    r.sources = lambda: []
    cert, blob = r._read()
    assert asyncio.run(r.renew_once(cert, blob)) == 0.0
    assert r.state.failures == 1 and "discovery.coordinators" in r.state.last_error
    assert r.status() == "" and r.state.by_result == {"no_source": 1}


def test_status_row_shows_expiry_and_renewal_state():
    from agent.cli.status import admission_cert, format_status

    now = time.time()
    stats = {"network": {"certificate": {"not_after": int(now + 3 * 86400)}},
             "worker": {"certificate_renewal": {"state": "waiting", "failures": 0,
                                                "renew_at": int(now + 86400)}}}
    row = admission_cert(stats)
    assert row is not None and row.startswith("until ") and "(3.0 days)" in row
    assert "renewal waiting (renews at" in row
    stats["worker"]["certificate_renewal"].update(state="failing", failures=4,
                                                  last_error="http://c1: no answer")
    assert "renewal failing, 4 failed: http://c1: no answer" in admission_cert(stats)
    assert "admission cert" in format_status(stats)
    assert admission_cert({"role": "worker"}) is None          # open network: no row value
