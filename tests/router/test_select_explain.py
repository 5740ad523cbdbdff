"""The router's cost parts where workers are shown: the dashboard's service table (and,
through the same ``add_route_costs``, ``?explain=1``, checked on a real cluster in
test_select_cluster.py)."""

from __future__ import annotations

from agent.dashboard.component import DashboardComponent
from agent.router.component import RouterComponent
from agent.router.policy import BAN_BASE_S, FAILURE_MS
from tests.discovery._support import make_discovery, make_record


async def test_dashboard_rows_carry_the_routers_cost_parts() -> None:
    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    good, bad = make_record(name="good"), make_record(name="bad")
    dht.add(good)
    dht.add(bad)
    dht.identity, dht.mode = None, "server"          # what the overview reads of the DHT
    dht.contacts, dht.peers = (lambda: []), (lambda: 0)
    router = RouterComponent(agent)
    dash = DashboardComponent(agent)
    agent.components += [router, dash]
    await comp.start()
    dash.hub.start()
    try:
        router.policy.success(good.worker_id, "ocr", 0.040)
        router.policy.failure(bad.worker_id, "ocr")   # fails fast: penalised, not fast
        await dash._activate()
        (svc,) = dash.state()["services"]
        rows = {w["name"]: w["router"] for w in svc["workers"]}
        keys = {"outstanding", "inflight", "queue", "capacity", "ewma_ms", "penalty",
                "retry_after", "hot", "cost"}
        assert keys <= set(rows["good"]) and keys <= set(rows["bad"])
        assert 30.0 < rows["good"]["ewma_ms"] <= 40.0 and rows["good"]["penalty"] == 0
        assert rows["bad"]["ewma_ms"] >= 0.9 * FAILURE_MS        # decays from the sample
        assert 0 < rows["bad"]["penalty"] <= BAN_BASE_S
        assert rows["bad"]["cost"] > rows["good"]["cost"]
    finally:
        await dash.hub.stop()
        await comp.stop()
