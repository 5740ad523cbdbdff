"""The gateway between real agent processes and real upstream HTTP servers.

One coordinator and two workers (``tests.cluster``), shared by the module to keep CI time
down:

- ``w1`` fronts ``echo`` (upstream A) with the default limits: methods, queries, binary
  bodies, 100 MB each way with the agent's RSS sampled, streaming, hop-by-hop headers,
  the ownership proof;
- ``w2`` fronts ``small`` (upstream B: ``max_body_mb = 1``, ``upstream_timeout = 1``,
  ``max_concurrency = 2``) and ``flaky`` (upstream C, stopped and restarted by the last
  test): 413, 504, 503-when-full, the in-flight load in the record, withdrawal.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.proof import PROOF_PATH, new_nonce, verify_proof
from tests.cluster import Cluster, Node, http, wait_until
from tests.gateway.upstream import Upstream, pattern, pattern_sha256
from tests.util import wait_for_async

pytestmark = pytest.mark.slow

MB = 1_000_000


class Net:
    def __init__(self, cl: Cluster, c1: Node, w1: Node, w2: Node, a: Upstream, b: Upstream,
                 c: Upstream) -> None:
        self.cl, self.c1, self.w1, self.w2 = cl, c1, w1, w2
        self.a, self.b, self.c = a, b, c


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    a, b, c = Upstream().start(), Upstream().start(), Upstream().start()
    tmp = Path(tmp_path_factory.mktemp("gw"))
    try:
        with Cluster(tmp, record_ttl=20, republish=3) as cl:
            c1 = cl.coordinator("c1")
            cl.start(c1)
            cl.wait_ready(c1)
            w1 = cl.worker("w1", [c1.dht_addr], services=["echo", "bare"],
                           extra={"gateway": {"upstreams": {"echo": a.url}}})
            w2 = cl.worker("w2", [c1.dht_addr], services=["small", "flaky"], extra={
                "gateway": {"max_body_mb": 1, "upstream_timeout": 1,
                            "upstreams": {"small": b.url,
                                          "flaky": {"url": c.url, "health": "/health"}}},
                "worker": {"max_concurrency": 2}})
            for w in (w1, w2):
                w.data["worker"]["endpoint"] = w.gateway_url     # what the proof signs
            cl.start(w1, w2)
            cl.wait_ready(w1, w2)
            yield Net(cl, c1, w1, w2, a, b, c)
    finally:
        for up in (a, b, c):
            up.stop()


def _get(url: str) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of a GET."""
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class RssSampler:
    """Samples a process's VmRSS every 20 ms on a thread; ``peak`` in kB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = _rss_kb(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_kb(self.pid))

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_kb(self.pid))


# ----------------------------------------------------------------------------- w1
async def test_methods_queries_and_binary_bodies(net: Net) -> None:
    body = bytes(range(256)) * 300 + b"\r\n\x00end"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            data = None if method == "GET" else body
            url = net.w1.gateway_url + "/echo/echo/a/b%20c/%2Fx?q=1&r=%C3%A9&empty=&q=2"
            async with s.request(method, url, data=data) as r:
                assert r.status == 200, await r.text()
                got = await r.json()
                assert r.headers["X-Upstream"] == "echo"
            assert got["method"] == method
            # the path and query arrive exactly as encoded by the caller
            assert got["path"] == "/echo/a/b%20c/%2Fx?q=1&r=%C3%A9&empty=&q=2"
            want = body if data is not None else b""
            assert (got["length"], got["sha256"]) == (len(want), hashlib.sha256(want).hexdigest())
        async with s.head(net.w1.gateway_url + "/echo/echo/x") as r:
            assert r.status == 200 and await r.read() == b""
        # the service prefix alone reaches the upstream's base URL
        async with s.get(net.w1.gateway_url + "/echo") as r:
            # upstream A's own 404 (text, not the gateway's JSON): it has no route at "/"
            assert r.status == 404 and r.content_type == "text/plain"
    assert net.a.last["method"] == "HEAD"


async def test_100mb_upload_and_download_stream_with_flat_rss(net: Net) -> None:
    size = 100 * MB
    pid = net.w1.proc.pid  # type: ignore[union-attr]

    async def gen() -> AsyncIterator[bytes]:
        for block in pattern(size):
            yield block

    want = pattern_sha256(size)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        with RssSampler(pid) as up_rss:
            async with s.put(net.w1.gateway_url + "/echo/upload", data=gen(),
                             headers={"Content-Length": str(size)}) as r:
                assert r.status == 200, await r.text()
                got = await r.json()
        assert got == {"length": size, "sha256": want}
        with RssSampler(pid) as down_rss:
            h = hashlib.sha256()
            n = 0
            async with s.get(net.w1.gateway_url + f"/echo/download?size={size}") as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(size)
                async for chunk in r.content.iter_chunked(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
        assert (n, h.hexdigest()) == (size, want)
        # and a chunked upload (no Content-Length) of the same body
        with RssSampler(pid) as chunked_rss:
            async with s.post(net.w1.gateway_url + "/echo/upload", data=gen()) as r:
                assert r.status == 200
                assert await r.json() == {"length": size, "sha256": want}
    growth = {name: (smp.peak - smp.base) / 1024 for name, smp in
              (("upload", up_rss), ("download", down_rss), ("chunked upload", chunked_rss))}
    print(f"agent RSS growth during 100 MB transfers (MiB): {growth}; "
          f"base {up_rss.base / 1024:.1f} MiB")
    for name, mib in growth.items():
        assert mib < 30, f"{name}: RSS grew {mib:.1f} MiB for a 100 MB body"


@pytest.mark.parametrize(("path", "ctype", "first", "rest"), [
    ("/echo/sse", "text/event-stream", b"event: tick\ndata: first\n\n", b"data: last\n\n"),
    ("/echo/chunked", "text/plain", b"part one;", b"part two."),
])
async def test_streamed_answers_arrive_as_written(net: Net, path: str, ctype: str,
                                                  first: bytes, rest: bytes) -> None:
    net.a.release.clear()
    try:
        async with aiohttp.ClientSession() as s, s.get(net.w1.gateway_url + path) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
            assert "Content-Length" not in r.headers
            assert r.headers.get("Transfer-Encoding") == "chunked"
            got = b""
            while len(got) < len(first):
                chunk = await asyncio.wait_for(r.content.readany(), 10)
                assert chunk, "stream ended early"
                got += chunk
            # the first part is here while the upstream is still holding the rest back
            assert got == first and not net.a.finished.is_set()
            net.a.release.set()
            assert await asyncio.wait_for(r.content.read(), 10) == rest
        # (the upstream thread marks itself finished just after its last write)
        assert await asyncio.to_thread(net.a.finished.wait, 5)
    finally:
        net.a.release.clear()


async def test_hop_by_hop_headers_never_cross(net: Net) -> None:
    headers = {"Connection": "X-Hop-Req, keep-alive", "X-Hop-Req": "secret",
               "Keep-Alive": "300", "TE": "trailers", "Proxy-Authorization": "Basic eDp5",
               "Upgrade": "h2c", "Trailer": "X-T", "Proxy-Connection": "keep-alive",
               "X-End-To-End": "kept", "X-Forwarded-For": "203.0.113.9",
               "Forwarded": "for=203.0.113.9", "Accept-Encoding": "gzip"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(net.w1.gateway_url + "/echo/echo/h", data=b"x",
                          headers=headers) as r:
            assert r.status == 200
            seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        for hop in ("x-hop-req", "keep-alive", "te", "proxy-authorization", "upgrade",
                    "trailer", "proxy-connection"):
            assert hop not in seen, (hop, seen)
        assert seen.get("connection", "keep-alive") == "keep-alive"
        assert seen["x-end-to-end"] == "kept" and seen["accept-encoding"] == "gzip"
        # forwarding headers are appended to, not replaced
        assert seen["x-forwarded-for"].startswith("203.0.113.9, 127.")
        assert seen["forwarded"].startswith("for=203.0.113.9, for=127.")
        async with s.get(net.w1.gateway_url + "/echo/hop") as r:
            assert r.status == 200 and await r.text() == "hop"
            got = {k.lower() for k in r.headers}
            assert r.headers["X-End-To-End"] == "kept"
        for hop in ("x-hop-resp", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
            assert hop not in got, (hop, dict(r.headers))


async def test_ownership_proof_verifies_against_the_announced_record(net: Net) -> None:
    nonce = new_nonce()
    status, proof = http("GET", f"{net.w1.gateway_url}{PROOF_PATH}?nonce={nonce}")
    assert status == 200, proof
    records, _, _ = net.c1.provider_records("echo")
    (rec,) = [r for r in records if r["name"] == "w1"]
    assert rec["endpoint"] == net.w1.gateway_url
    key = base64.b64decode(proof["public_key"])
    assert hashlib.sha1(key).hexdigest() == rec["id"]      # the record's id is its key's hash
    verify_proof(proof, public_key=key, nonce=bytes.fromhex(nonce), endpoint=rec["endpoint"])
    with pytest.raises(ValueError):                          # bound to nonce and endpoint
        verify_proof(proof, public_key=key, nonce=bytes.fromhex(new_nonce()),
                     endpoint=rec["endpoint"])
    for bad in ("", "zz" * 16, "00" * 8, "00" * 65):
        status, body = http("GET", f"{net.w1.gateway_url}{PROOF_PATH}?nonce={bad}")
        assert status == 400 and "nonce" in body["error"], (bad, body)


ADMIN_PATHS = [
    ("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/api/dht/stats"), ("GET", "/api/dht/topology"),
    ("GET", "/api/dht/providers/echo"), ("GET", "/api/services"),
    ("GET", "/api/services/echo"), ("GET", "/api/services/echo?explain=1"),
    ("POST", "/api/services/echo/report"), ("PUT", "/api/worker/load"),
    ("GET", "/api/events"), ("GET", "/api/services/echo/watch"),
    ("GET", "/route/echo/echo/x"), ("POST", "/route/echo/upload"),
]


def test_every_admin_path_is_404_on_the_worker_gateway(net: Net) -> None:
    for method, path in [*ADMIN_PATHS, ("GET", "/api/dht/bootstrap"),
                         ("POST", "/api/services/register"), ("GET", "/api/registry/echo"),
                         ("GET", "/ECHO-NOT/x"), ("GET", "/.well-known/other")]:
        status, body = http(method, net.w1.gateway_url + path, raw=b"{}" if method != "GET"
                            else None)
        assert status == 404 and isinstance(body, dict) and "error" in body, (method, path,
                                                                               status, body)
    # the admin API still serves them, and counts the gateway's work
    assert net.w1.get("/api/dht/stats")[0] == 200
    status, text = net.w1.get("/metrics")
    assert status == 200
    for line in ('rma_agent_gateway_requests_total{outcome="ok"}',
                 'rma_agent_gateway_requests_total{outcome="unknown_service"}',
                 'rma_agent_gateway_bytes_total{direction="in"}',
                 'rma_agent_gateway_upstream_up{service="echo"} 1.0',
                 "rma_agent_gateway_inflight 0.0"):
        assert line in text, line


def test_dot_segments_are_refused_before_the_upstream(net: Net) -> None:
    before = _hits(net.a)
    for path in ("/echo/echo/../upload", "/echo/echo/%2e%2e/upload"):
        req = urllib.request.Request(net.w1.gateway_url + path)
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=5)
        assert ei.value.code == 400 and "segments" in json.loads(ei.value.read())["error"]
    assert _hits(net.a) == before


def _raw(url: str, data: bytes) -> bytes:
    """Send ``data`` as-is to the listener of ``url``; what comes back before it closes
    (or 3 s pass)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


@pytest.mark.parametrize("data", [
    b"\x00\xff\x16\x03\x01garbage\r\n\r\n",                         # TLS/junk on plain HTTP
    b"GET /echo/x HTTP/9.9\r\nHost: a\r\n\r\n",                         # unknown version
    b"GET /echo/x HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n",  # huge header
    b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",                   # smuggling shape
    b"BREW /echo/x HTTP/1.1\r\nHost: a\r\n\r\n",                        # unknown method
    b"GET /%zz/x HTTP/1.1\r\nHost: a\r\n\r\n",                          # bad escape
    b"GET /.well-known/rma-agent/proof?nonce=" + b"0" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
])
def test_hostile_requests_to_the_public_gateway_get_4xx_never_5xx(net: Net,
                                                                  data: bytes) -> None:
    """The gateway faces the internet through the tunnel: malformed or hostile requests
    are answered 4xx (or the connection is closed), never 500, and it keeps serving."""
    out = _raw(net.w1.gateway_url, data)
    if out:
        status = int(out.split(b" ", 2)[1])
        assert 400 <= status < 500, out[:200]
    status, _h, _b = _get(net.w1.gateway_url + PROOF_PATH + "?nonce=" + new_nonce())
    assert status == 200


def test_service_without_upstream_is_a_502_not_processed(net: Net) -> None:
    status, headers, body = _get(net.w1.gateway_url + "/bare/x")
    assert status == 502 and "gateway.upstreams" in body["error"]
    assert headers["RMA-Not-Processed"] == "1"


def test_coordinator_gateway_serves_only_its_three_paths(net: Net) -> None:
    g = net.c1.gateway_url
    status, body = http("GET", g + "/api/dht/bootstrap")
    assert status == 200 and body["seeds"]
    status, body = http("GET", g + "/api/registry/echo")
    assert status == 200 and body["records"] == []
    status, body = http("POST", g + "/api/services/register", body={"record": "!!"})
    assert status == 400 and "base64" in body["error"]
    for method, path in [*ADMIN_PATHS, ("GET", "/echo/echo/x"),
                         (("GET", PROOF_PATH + "?nonce=" + "00" * 16))]:
        status, body = http(method, g + path, raw=b"{}" if method != "GET" else None)
        assert status == 404 and "error" in body, (method, path, status, body)


# ----------------------------------------------------------------------------- w2
def _hits(up: Upstream) -> int:
    return sum(up.hits.values())


async def test_body_limit_413_declared_and_streamed(net: Net) -> None:
    before = _hits(net.b)
    async with aiohttp.ClientSession() as s:
        async with s.post(net.w2.gateway_url + "/small/upload", data=b"x" * (2 * MB)) as r:
            assert r.status == 413
            assert "gateway.max_body_mb" in (await r.json())["error"]
            assert r.headers["RMA-Not-Processed"] == "1"
        assert _hits(net.b) == before            # refused before touching the upstream

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"y" * 65536               # 2.6 MB without a Content-Length

        async with s.post(net.w2.gateway_url + "/small/upload", data=chunked()) as r:
            assert r.status == 413, await r.text()
            assert "gateway.max_body_mb" in (await r.json())["error"]
        # under the limit passes
        async with s.post(net.w2.gateway_url + "/small/upload", data=b"z" * 1000) as r:
            assert r.status == 200 and (await r.json())["length"] == 1000


async def test_silent_upstream_is_a_504(net: Net) -> None:
    """The gateway gives up on its own read timeout (1 s here): the 504 arrives while the
    upstream still holds the request (it answers only when released)."""
    net.b.slow_release.clear()
    answered = net.b.hits["slow_answered"]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(net.w2.gateway_url + "/small/slow?delay=60") as r:
                assert r.status == 504
                assert "gateway.upstream_timeout" in (await r.json())["error"]
        assert net.b.hits["slow_answered"] == answered       # the upstream never answered
    finally:
        net.b.slow_release.set()
        wait_until(lambda: net.b.hits["slow_answered"] > answered, 10, "the upstream released")
        net.b.slow_release.clear()


async def test_full_worker_answers_503_without_touching_the_upstream(net: Net) -> None:
    net.b.release.clear()
    url = net.w2.gateway_url + "/small/hold"
    async with aiohttp.ClientSession() as s:
        held = [asyncio.ensure_future(s.get(url)) for _ in range(2)]
        try:
            await wait_for_async(lambda: net.b.holding == 2, what="the upstream holding 2")
            before = _hits(net.b)
            async with s.post(url, data=b"work") as r:
                assert r.status == 503
                assert r.headers["RMA-Not-Processed"] == "1" and r.headers["Retry-After"]
                assert "max_concurrency" in (await r.json())["error"]
            assert _hits(net.b) == before
            # the in-flight count is the record's load
            def load() -> float:
                recs, _, _ = net.c1.provider_records("small")
                return max((r["load"] for r in recs if r["name"] == "w2"), default=-1)
            await asyncio.to_thread(wait_until, lambda: load() == 2, 15, "load 2 in the record")
        finally:
            net.b.release.set()
            for fut in held:
                resp = await fut
                assert resp.status == 200 and (await resp.read()).endswith(b"held")
            net.b.release.clear()
    await asyncio.to_thread(wait_until, lambda: load() == 0, 15, "load back to 0")


async def test_caller_hanging_up_cancels_the_upstream_request(net: Net) -> None:
    net.b.release.clear()
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.get(net.w2.gateway_url + "/small/hold")
            assert resp.status == 200
            await resp.content.readany()                 # the upstream is working on it
            assert net.b.holding == 1
            resp.close()                                 # the caller goes away
        # without release: the gateway cut it off
        await wait_for_async(lambda: net.b.holding == 0, what="the upstream request cancelled")
        _, stats = await asyncio.to_thread(net.w2.get, "/api/dht/stats")
        assert stats["gateway"]["inflight"] == 0
    finally:
        net.b.release.clear()


def test_upstream_down_is_withdrawn_then_announced_again(net: Net) -> None:
    c1, w2 = net.c1, net.w2

    def services_of_w2() -> set[str]:
        out = set()
        for svc in ("small", "flaky"):
            if "w2" in c1.providers(svc)[0]:
                out.add(svc)
        return out

    wait_until(lambda: services_of_w2() == {"small", "flaky"}, 15, "both services announced")
    net.c.stop()
    try:
        wait_until(lambda: services_of_w2() == {"small"}, 20, "flaky withdrawn, small kept")
        status, body = w2.get("/readyz")
        assert status == 503 and "flaky" in body["error"] and "small" not in body["error"]
        stats = w2.get("/api/dht/stats")[1]
        assert stats["gateway"]["down"] == ["flaky"]
        assert "upstream of flaky is down" in w2.log_text()
        status, headers, body = _get(w2.gateway_url + "/flaky/health")
        assert status == 502 and "unreachable" in body["error"]
        assert headers["RMA-Not-Processed"] == "1"           # nothing reached an upstream
    finally:
        net.c.start()                              # same port again
    wait_until(lambda: services_of_w2() == {"small", "flaky"}, 20, "flaky announced again")
    wait_until(lambda: w2.get("/readyz")[0] == 200, 10, "w2 ready again")
    assert "upstream of flaky is back" in w2.log_text()
