"""The dashboard in a real browser (Debian's chromium, headless, through chromedriver)
against a real cluster: one coordinator and three workers on loopback.

Checks: the page loads without console errors, lists the three workers of ``ocr``,
shows a stopped worker as gone without a reload (the time it took is printed, not
asserted: speed is bench/'s), is reachable by keyboard, and fits a phone's width. Screenshots and the page's weight and first-render time are
written to ``tests/artifacts/`` (git-ignored) and printed.

In CI (``CI=true``) a missing browser or driver fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agent.component import Component
from tests.cluster import REPO, Cluster
from tests.cluster import http as http_call
from tests.sse import SSEReader
from tests.util import require, wait_for

ARTIFACTS = REPO / "tests" / "artifacts"
STATIC = REPO / "agent" / "static"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _require_browser() -> Any:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (shutil.which(p) or Path(p).exists())]
    try:
        from selenium import webdriver
    except ImportError as exc:
        missing.append(f"selenium ({exc})")
        webdriver = None
    if missing:
        msg = (f"browser test needs {', '.join(missing)} (packaging/deps.sh installs chromium "
               "and chromium-driver; pip extra [test] installs selenium)")
        require(msg)               # a skip here, a failure in CI
    return webdriver


@pytest.fixture(scope="module")
def browser():
    webdriver = _require_browser()
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("dash"), record_ttl=20, republish=3) as cl:
        c1 = cl.coordinator("c1")
        cl.start(c1)
        cl.wait_ready(c1)
        workers = [cl.worker(f"w{i}", seeds=[c1.dht_addr], services=["ocr"], mode="client")
                   for i in (1, 2, 3)]
        cl.start(*workers)
        cl.wait_ready(*workers)
        wait_for(lambda: c1.providers("ocr")[0] == {"w1", "w2", "w3"}, 20, 0.2,
                 "all three workers in the DHT")
        yield cl, c1, workers


ROWS_JS = """
return Array.from(document.querySelectorAll('#service-list [data-service="ocr"] tbody tr'))
  .filter(tr => !tr.classList.contains('excluded')).map(tr => tr.dataset.worker);
"""


# resolves after two animation frames: the page has laid out and painted at its new size
FRAMES_JS = """
const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => done(window.innerWidth)));
"""


def _resize(driver: Any, width: int, height: int) -> None:
    """Resize the window and wait until the page has been laid out at the new size."""
    driver.set_window_size(width, height)
    wait_for(lambda: driver.execute_async_script(FRAMES_JS) <= width, 10, 0.05,
             f"the page laid out at {width} px")


def _screenshot(driver: Any, width: int, name: str) -> Path:
    _resize(driver, width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    _resize(driver, width, min(int(height) + 140, 6000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _severe(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("level") in ("SEVERE", "ERROR")]


@pytest.mark.slow
def test_dashboard_in_a_real_browser(cluster, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    cl, c1, (_w1, w2, _w3) = cluster
    d = browser
    d.get(c1.url + "/")
    rows = wait_for(lambda: sorted(d.execute_script(ROWS_JS) or []) == ["w1", "w2", "w3"]
                    and d.execute_script(ROWS_JS), 15, 0.1, "three ocr workers on the page")
    assert sorted(rows) == ["w1", "w2", "w3"]
    assert d.find_element("id", "conn").text == "live"
    tiles = d.find_element("id", "tiles").text
    assert "workers\n3" in tiles and "coordinators\n1" in tiles, tiles

    # weight and time to first render, from the browser's own timing
    perf = d.execute_script("""
      const nav = performance.getEntriesByType('navigation')[0];
      const res = performance.getEntriesByType('resource')
        .filter(r => r.name.includes('/static/'))
        .map(r => ({name: r.name, bytes: r.decodedBodySize}));
      const paint = Object.fromEntries(performance.getEntriesByType('paint')
        .map(p => [p.name, p.startTime]));
      const mark = performance.getEntriesByName('rma-first-render')[0];
      return {html: nav.decodedBodySize, assets: res, paint: paint,
              first_render_ms: mark ? mark.startTime : null,
              dom_content_loaded_ms: nav.domContentLoadedEventEnd};""")
    weight = perf["html"] + sum(a["bytes"] for a in perf["assets"])
    on_disk = sum((STATIC / f).stat().st_size for f in ("index.html", "app.js", "app.css"))
    assert len(perf["assets"]) == 2 and weight == on_disk, perf
    assert perf["first_render_ms"] is not None
    report = {"page_weight_bytes": weight, "first_contentful_paint_ms":
              perf["paint"].get("first-contentful-paint"),
              "first_render_with_data_ms": perf["first_render_ms"],
              "dom_content_loaded_ms": perf["dom_content_loaded_ms"], "assets": perf["assets"]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dashboard-metrics.json").write_text(json.dumps(report, indent=2))
    print("dashboard metrics:", json.dumps(report))

    # keyboard only: Tab reaches the ring's service picker; arrows choose a service
    d.execute_script("document.activeElement && document.activeElement.blur(); "
                     "window.scrollTo(0, 0);")
    reached = False
    for _ in range(12):
        ActionChains(d).send_keys(Keys.TAB).perform()
        if d.execute_script("return document.activeElement.id") == "ring-service":
            reached = True
            break
    assert reached, "Tab never reached the service picker"
    # the ring shows the key's closest nodes once a service is chosen
    wait_for(lambda: d.find_element("id", "ring-service").get_attribute("value") == "ocr",
             5, 0.1, "ocr preselected in the ring picker")
    wait_for(lambda: "closest known nodes" in d.find_element("id", "ring-legend").text,
             12, 0.2, "ring legend with the key's closest nodes")

    desktop = _screenshot(d, 1280, "dashboard-desktop.png")
    assert desktop.stat().st_size > 10_000

    # a stopped worker disappears without a reload
    d.execute_script("window.__noReload = 42;")
    t0 = time.monotonic()
    cl.kill(w2, 15)                               # SIGTERM: the worker withdraws
    wait_for(lambda: sorted(d.execute_script(ROWS_JS) or []) == ["w1", "w3"], 20, 0.05,
             "w2 gone from the page")
    gone_s = time.monotonic() - t0
    print(f"stopped worker gone from the page after {gone_s:.2f} s")
    assert d.execute_script("return window.__noReload") == 42
    wait_for(lambda: "w2 withdrew from ocr" in d.find_element("id", "events").text, 5, 0.1,
             "the withdrawal of w2 in the event log")
    # the tables have no sideways scrolling either (score parts wrap)
    assert d.execute_script("return Array.from(document.querySelectorAll('.tablewrap'))"
                            ".every(w => w.scrollWidth <= w.clientWidth + 1)")

    # a phone: one column, no sideways scrolling, still the two workers
    phone = _screenshot(d, 390, "dashboard-phone.png")
    assert phone.stat().st_size > 10_000
    overflow = d.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"page is {overflow}px wider than a phone screen"
    assert d.execute_script("return Array.from(document.querySelectorAll('.tablewrap'))"
                            ".every(w => w.scrollWidth <= w.clientWidth + 1)"), \
        "worker cards scroll sideways on a phone"
    assert sorted(d.execute_script(ROWS_JS)) == ["w1", "w3"]

    logs = d.get_log("browser")
    assert not _severe(logs), logs
    cl.wait_healthy(c1)


@pytest.mark.slow
def test_page_assets_and_endpoints(cluster):
    _cl, c1, _ = cluster
    status, body = http_call("GET", c1.url + "/")
    assert status == 200 and "<title>rma-agent dashboard</title>" in body
    status, _ = http_call("GET", c1.url + "/static/app.js")
    assert status == 200
    status, body = http_call("GET", c1.url + "/static/../config.py")
    assert status == 404 and "error" in body
    status, body = http_call("GET", c1.url + "/static/nope.js")
    assert status == 404 and "error" in body
    status, ring = http_call("GET", c1.url + "/api/dashboard/ring?service=ocr")
    assert status == 200 and ring["key"] and ring["closest"][0] == ring["self"]
    status, body = http_call("GET", c1.url + "/api/dashboard/ring?service=BAD!")
    assert status == 400 and "error" in body
    status, dash = http_call("GET", c1.url + "/api/dashboard")
    assert status == 200 and dash["state"]["agent"]["role"] == "coordinator"
    # samples: the first one sets the baseline, so the ring holds one after two SAMPLE_S
    # (run on its own, this test comes sooner after the agent started than that)
    wait_for(lambda: http_call("GET", c1.url + "/api/dashboard")[1]["samples"], 10, 0.5,
             "a first sample in the dashboard's ring")


@pytest.mark.slow
def test_events_stream_sends_state_and_resumable_log(cluster):
    _cl, c1, _ = cluster
    rd = SSEReader(c1.ip, c1.http_port, "/api/events")
    assert rd.status == 200
    got = rd.until(lambda ev: ev[1] == "state", 10, "a state frame")
    logs = [ev for ev in got if ev[1] == "log"]
    assert logs and all(ev[0] for ev in logs)             # the log replays, with ids
    state = got[-1][2]
    assert state["agent"]["role"] == "coordinator" and state["services"]
    rd.until(lambda ev: ev[1] == "sample", 10, "a sample frame")
    # a reload and a failing worker are logged; the worker shows as backed off
    assert c1.proc is not None
    c1.proc.send_signal(signal.SIGHUP)
    rd.until(lambda ev: ev[1] == "log" and ev[2]["kind"] == "reload", 10, "reload logged")
    w1_id = next(w["id"] for s in state["services"] for w in s["workers"] if w["name"] == "w1")
    status, _ = http_call("POST", c1.url + "/api/services/ocr/report",
                          {"worker_id": w1_id, "ok": False})
    assert status == 200
    rd.until(lambda ev: ev[1] == "log" and ev[2]["kind"] == "failing"
             and ev[2]["worker_id"] == w1_id, 10, "failure logged")

    def backed_off(ev: tuple[str, str, Any]) -> bool:
        if ev[1] != "state":
            return False
        (ocr,) = [s for s in ev[2]["services"] if s["name"] == "ocr"]
        return any(x["name"] == "w1" and x["state"] == "backed off"
                   and x["reason"].startswith("backed off") for x in ocr["excluded"])

    rd.until(backed_off, 10, "w1 shown as backed off")
    rd.close()
    # resume after the first log event: the rest of the log, not the first one again
    rd2 = SSEReader(c1.ip, c1.http_port, "/api/events", {"Last-Event-ID": logs[0][0]})
    again = rd2.until(lambda ev: ev[1] == "state", 10, "state after resume")
    ids = [ev[0] for ev in again if ev[1] == "log"]
    assert logs[0][0] not in ids and ids[:len(logs) - 1] == [ev[0] for ev in logs[1:]]
    assert len(ids) > len(logs) - 1          # and what was logged since (reload, failing)
    rd2.close()


class _FakeRouter(Component):
    """Stands for the router component: only its ``"router"`` stats block matters here."""

    name = "router"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.block = {"requests": 0, "ok": 0, "failed": 0, "retries": 0, "attempts": 0}

    def stats(self) -> dict[str, Any]:
        return {"router": dict(self.block)}


async def test_samples_rates_percentiles_and_the_router_block():
    from agent.dashboard.component import DashboardComponent
    from tests.discovery._support import make_discovery, make_record

    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    dht.add(make_record(name="w"))
    dash = DashboardComponent(agent)
    agent.components.append(dash)
    await comp.start()
    try:
        assert dash._sample() is None                  # the first call sets the baseline
        for _ in range(20):
            await comp.lookup("ocr")
        # a rate is the counters' change over the time since the last sample: any time
        # will do (the lookups above are done), so no waiting here
        s1 = dash._sample()
        assert s1 is not None and s1["lookups_s"] > 0 and s1["p50_ms"] is not None
        assert s1["routed_s"] == 0 and s1["router"] is False    # "no router" on the page
        router = _FakeRouter(agent)
        agent.components.append(router)
        dash._sample()
        router.block.update(requests=30, ok=27, failed=3)
        s2 = dash._sample()
        assert s2 is not None and s2["router"] is True
        assert s2["routed_s"] > 0 and s2["errors_s"] > 0 and s2["lookups_s"] == 0
        assert s2["p50_ms"] is None                     # no lookups in that interval
        assert list(dash.samples)[-1] == s2
    finally:
        await comp.stop()


def test_local_records_expire_by_their_own_refresh():
    """The event log's "expired" for records this node stores uses each record's own
    ``refresh`` (as lookups do), not this agent's republish interval: a worker that
    refreshes every 60 s was logged "expired" and "joined" again on every refresh when
    the dashboard's agent republishes every 10 s."""
    import time

    from agent.dashboard.component import DashboardComponent
    from tests.discovery._support import make_discovery, make_record

    agent, _comp, _dht = make_discovery(republish=10)
    dash = DashboardComponent(agent)
    now = time.time()
    slow = make_record(name="slow", refresh=60.0, now=now)
    quick = make_record(name="quick", refresh=10.0, now=now)
    dash.eventlog.on_record(slow)
    dash.eventlog.on_record(quick)
    assert [e["kind"] for e in dash.eventlog.items] == ["joined", "joined"]
    dash._check_local(now + 30)              # quick: 30 s > 2 x 10 s; slow: < 2 x 60 s
    expired = [e["worker"] for e in dash.eventlog.items if e["kind"] == "expired"]
    assert expired == ["quick"], list(dash.eventlog.items)
    dash._check_local(now + 121)
    expired = [e["worker"] for e in dash.eventlog.items if e["kind"] == "expired"]
    assert expired == ["quick", "slow"], list(dash.eventlog.items)


async def test_state_shows_each_workers_version_and_the_fleets():
    """Record format 2 carries ``agent_version`` so that the dashboard can show a fleet's
    versions (issue 13): each worker row names its version, the overview counts them."""
    from agent.dashboard.component import DashboardComponent
    from tests.discovery._support import make_discovery, make_record

    agent, comp, dht = make_discovery()
    comp.prober.top = 0
    for name, version in (("new1", "0.2.0"), ("new2", "0.2.0"), ("old", "0.1.9")):
        dht.add(make_record(name=name, agent_version=version))
    dht.identity, dht.mode = None, "server"          # what the overview reads of the DHT
    dht.contacts, dht.peers = (lambda: []), (lambda: 0)
    dash = DashboardComponent(agent)
    agent.components.append(dash)
    await comp.start()
    dash.hub.start()
    try:
        await dash._activate()
        st = dash.state()
        assert st["agent"]["versions"] == {"0.1.9": 1, "0.2.0": 2}, st["agent"]
        (svc,) = st["services"]
        assert {w["name"]: w["version"] for w in svc["workers"]} == {
            "new1": "0.2.0", "new2": "0.2.0", "old": "0.1.9"}
    finally:
        await dash.hub.stop()
        await comp.stop()


async def test_ring_takes_service_names_as_typed():
    """One service-name rule everywhere: user input is lowercased (``normalize_service``)
    before it is checked; the ring answered 400 to ``?service=OCR``."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from agent.dashboard.component import DashboardComponent
    from tests.discovery._support import make_discovery

    agent, _comp, _dht = make_discovery()
    dash = DashboardComponent(agent)
    asked: list[str | None] = []

    def ring(service: str | None) -> dict[str, Any]:
        asked.append(service)
        return {"service": service}

    dash.ring = ring                                  # type: ignore[method-assign]
    app = web.Application()
    dash.add_routes(app)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/api/dashboard/ring?service=OCR")
        assert r.status == 200 and (await r.json())["service"] == "ocr"
        r = await client.get("/api/dashboard/ring?service=BAD!")
        assert r.status == 400 and "error" in await r.json()
    assert asked == ["ocr"]


def test_a_back_off_that_outlasts_the_record_still_names_the_worker():
    """A killed worker's back-off (the router's failures) ends after its record turned
    stale and left the page; the "recovered" line named it by a bare id
    ("worker aa4b2a8a14e5: back-off over" in the demo)."""
    import time

    from agent.dashboard.component import DashboardComponent
    from agent.dht.identity import Identity
    from tests.discovery._support import make_discovery, make_record

    agent, comp, _dht = make_discovery(republish=10)
    dash = DashboardComponent(agent)
    now = time.time()
    ident = Identity.generate()
    dash.eventlog.on_record(make_record(ident, name="gpu-7", refresh=10.0, now=now))
    comp.tracker.base_backoff_s = 60.0          # a back-off longer than the record lives
    comp.tracker.record_failure(ident.node_id, now)
    dash._check_local(now + 1)                  # failing: backed off
    dash._check_local(now + 25)                 # stale (> 2 x 10 s): gone from the page
    comp.tracker.forgive(ident.node_id)
    dash._check_local(now + 26)                 # back-off over
    lines = {e["kind"]: e["text"] for e in dash.eventlog.items}
    assert lines["expired"].startswith("gpu-7 expired")
    assert lines["recovered"] == "worker gpu-7: back-off over", lines
