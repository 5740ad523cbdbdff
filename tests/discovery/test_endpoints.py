"""The endpoint rule (no SSRF): which endpoints callers may contact, and the connector
that enforces it again below every caller-side session — at connect time, after DNS."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from agent.config import parse_config
from agent.dht.identity import Identity
from agent.discovery.endpoints import (
    Allowance,
    EndpointRefused,
    GuardedConnector,
    endpoint_refusal,
)
from agent.discovery.ownership import OwnershipVerifier
from agent.proof import PROOF_PATH, make_proof, parse_nonce

LOOPBACK = Allowance(private=("127.0.0.0/8", "::1", "localhost"))


@pytest.mark.parametrize("endpoint", [
    "https://abc.trycloudflare.com", "https://gpu.example.org:8443/x", "https://8.8.8.8/",
    "https://[2606:4700::1111]/",
])
def test_public_https_allowed_by_default(endpoint: str) -> None:
    assert endpoint_refusal(endpoint) is None


@pytest.mark.parametrize("endpoint,why", [
    # issue 20: https:// no longer reaches the caller's own networks
    ("https://169.254.169.254/latest", "link-local address 169.254.169.254"),
    ("https://10.0.0.1:6443/api", "private address 10.0.0.1"),
    ("https://172.16.3.4/", "private address"),
    ("https://192.168.1.1/", "private address"),
    ("https://100.64.0.1/", "CGNAT address"),
    ("https://[fd00::1]/", "private address"),
    ("https://[fe80::1]/", "link-local address"),
    ("https://[::ffff:127.0.0.1]/", "loopback address"),
    ("https://0.0.0.0/", "unspecified address"),
    ("https://[::]/", "unspecified address"),
    ("http://127.0.0.1:6666", "loopback address 127.0.0.1"),
    ("http://[::1]:8090", "loopback address"),
    ("https://localhost", "loopback address localhost"),
    ("http://gpu.lan:9000", "plain http to gpu.lan"),
    ("http://8.8.8.8/", "plain http"),
    ("ftp://127.0.0.1/", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("127.0.0.1:8090", "scheme"),
    ("https://user:pw@example.org", "credentials"),
    ("https://example.org/?next=http://10.0.0.1", "query"),
    ("https://example.org/#x", "fragment"),
    ("http://127.0.0.1:99999", "not a valid URL"),
    ("", "no endpoint"),
    ("https://", "no host"),
])
def test_refused_by_default(endpoint: str, why: str) -> None:
    reason = endpoint_refusal(endpoint)
    assert reason is not None and why in reason, reason


def test_allow_private_hosts_names_addresses_networks_and_hosts() -> None:
    for ep in ("http://127.0.0.1:8090", "http://127.9.8.7:1/base", "http://[::1]:8090",
               "http://localhost", "https://127.0.0.1"):
        assert endpoint_refusal(ep, LOOPBACK) is None, ep
    lan = Allowance(private=("192.168.1.0/24", "gpu.lan"))
    assert endpoint_refusal("https://192.168.1.5/", lan) is None
    assert endpoint_refusal("https://gpu.lan/", lan) is None
    assert "private address 192.168.2.5" in endpoint_refusal("https://192.168.2.5/", lan)
    # private does not mean plain http: that still needs allow_http_hosts
    assert "plain http" in endpoint_refusal("http://192.168.1.5/", lan)
    assert "link-local" in endpoint_refusal("https://169.254.169.254/", lan)


def test_allow_http_hosts_lets_a_lan_host_through() -> None:
    assert endpoint_refusal("http://gpu.lan:9000", ["GPU.lan"]) is None
    assert endpoint_refusal("http://192.168.1.5/", ["192.168.1.5"]) is None
    assert endpoint_refusal("http://192.168.1.6/", ["192.168.1.5"]) is not None


def test_the_config_keys_build_the_allowance() -> None:
    cfg = parse_config('[worker]\nservices = ["ocr"]\n[discovery]\n'
                       'allow_http_hosts = ["Gpu.lan"]\n'
                       'allow_private_hosts = ["127.0.0.0/8", "10.1.2.3"]\n')
    allow = Allowance.from_config(cfg.discovery)
    assert endpoint_refusal("http://127.3.4.5:9/", allow) is None
    assert endpoint_refusal("https://10.1.2.3/", allow) is None
    assert endpoint_refusal("http://gpu.lan/", allow) is None
    assert endpoint_refusal("https://10.1.2.4/", allow) is not None


async def test_connector_refuses_and_counts_without_connecting() -> None:
    conn = GuardedConnector(lambda: ())
    async with aiohttp.ClientSession(connector=conn) as s:
        with pytest.raises(EndpointRefused):
            await s.get("http://10.0.0.1/x")
        with pytest.raises(EndpointRefused):
            await s.get("https://10.0.0.1:80/redirected")
    assert conn.contacts["10.0.0.1"] == 2 and conn.refused == 2


class _Listener:
    """A real HTTP server on 127.0.0.1 that counts what reaches it and serves proofs."""

    def __init__(self) -> None:
        self.hits = 0
        self.ident = Identity.generate()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        nonce = parse_nonce(request.query["nonce"])
        return web.json_response(make_proof(self.ident, nonce,
                                            f"http://{request.host.split(':')[0]}:{self.port}"))

    async def __aenter__(self) -> _Listener:
        app = web.Application()
        app.router.add_get(PROOF_PATH, self.handle)
        app.router.add_get("/", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class _Zone(AbstractResolver):
    """A DNS zone of one's own: ``name -> address`` (what an attacker's DNS answers)."""

    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.zone:
            raise OSError(f"no such name {host}")
        return [{"hostname": host, "host": ip, "port": port, "proto": 0, "flags": 0,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET}
                for ip in self.zone[host]]

    async def close(self) -> None:
        return None


async def test_a_name_that_resolves_privately_is_refused_at_connect_time() -> None:
    """``https://rebind.example`` passes the static rule (a public-looking name); its DNS
    answers 127.0.0.1 (or 169.254.169.254): refused once resolved, nothing reaches the
    listener. A mixed answer keeps only the allowed addresses."""
    async with _Listener() as srv:
        zone = _Zone({"rebind.example": ["127.0.0.1"], "meta.example": ["169.254.169.254"],
                      "mixed.example": ["127.0.0.1", "8.8.8.8"]})
        conn = GuardedConnector(lambda: Allowance(), dns=zone)
        async with aiohttp.ClientSession(connector=conn) as s:
            with pytest.raises(EndpointRefused, match=r"loopback address rebind\.example"):
                await s.get(f"https://rebind.example:{srv.port}/")
            with pytest.raises(EndpointRefused, match=r"link-local address meta\.example"):
                await s.get("https://meta.example/latest/meta-data")
            resolved = await conn._guarded_resolver.resolve("mixed.example", 80)
            assert [r["host"] for r in resolved] == ["8.8.8.8"]
        assert srv.hits == 0 and conn.refused == 2
        # named by the config (plain http to it, and its private address): it goes through
        allow = Allowance(http_hosts=("rebind.example",), private=("127.0.0.1",))
        async with aiohttp.ClientSession(connector=GuardedConnector(lambda: allow,
                                                                    dns=zone)) as s:
            async with s.get(f"http://rebind.example:{srv.port}/?nonce={'00' * 16}") as resp:
                assert resp.status == 200
        assert srv.hits == 1


async def test_proof_requests_obey_the_rule() -> None:
    """Issue 20: a registered fake record made callers send a proof request to their own
    ``127.0.0.1:6666``. The verifier contacts nothing the rule refuses, and nothing at all
    through a session that does not enforce it."""
    async with _Listener() as srv:
        endpoint = f"http://127.0.0.1:{srv.port}"
        ver = OwnershipVerifier()
        async with aiohttp.ClientSession(connector=GuardedConnector(lambda: ())) as s:
            out = await ver.check(s, srv.ident.node_id, endpoint, srv.ident.public_key)
        assert out.kind == "down" and "loopback address" in out.reason
        async with aiohttp.ClientSession() as s:            # unguarded
            out = await ver.check(s, srv.ident.node_id, endpoint, srv.ident.public_key)
        assert out.kind == "down" and "does not enforce" in out.reason
        assert srv.hits == 0 and ver.counts["refused"] == 1
        conn = GuardedConnector(lambda: LOOPBACK)
        async with aiohttp.ClientSession(connector=conn) as s:
            out = await ver.check(s, srv.ident.node_id, endpoint, srv.ident.public_key)
        assert out.kind == "ok", out.reason
        assert srv.hits == 1


async def test_a_narrower_rule_applies_to_cached_resolutions() -> None:
    """A config reload that stops allowing a private address takes effect at once, even
    for a name whose private resolution the connector cached under the old rule."""
    async with _Listener() as srv:
        zone = _Zone({"rebind.example": ["127.0.0.1"]})
        rule = [Allowance(private=("127.0.0.1",))]
        conn = GuardedConnector(lambda: rule[0], dns=zone, force_close=True)
        async with aiohttp.ClientSession(connector=conn) as s:
            url = f"https://rebind.example:{srv.port}/"
            # allowed: resolved and connected (the listener speaks no TLS: that fails)
            with pytest.raises(aiohttp.ClientError) as first:
                await s.get(url)
            assert not isinstance(first.value, EndpointRefused)
            rule[0] = Allowance()
            with pytest.raises(EndpointRefused, match="loopback address"):
                await s.get(url)
        assert conn.refused == 1


async def test_legacy_numeric_forms_of_loopback_are_refused() -> None:
    """``127.1``, ``2130706433`` and ``0x7f.1`` are not addresses to ``ipaddress`` (so the
    static rule sees names) but the system resolver maps them onto 127.0.0.1: refused
    before any packet, by aiohttp's canonical-address check or by the resolver's."""
    async with _Listener() as srv:
        conn = GuardedConnector(lambda: Allowance())
        async with aiohttp.ClientSession(connector=conn) as s:
            for host in ("127.1", "2130706433", "0x7f.1"):
                with pytest.raises(aiohttp.ClientError) as err:
                    await s.get(f"https://{host}:{srv.port}/")
                assert not isinstance(err.value, aiohttp.ClientConnectorSSLError)
            with pytest.raises(EndpointRefused, match=r"loopback address 0x7f\.1"):
                await s.get(f"https://0x7f.1:{srv.port}/")
        assert srv.hits == 0
