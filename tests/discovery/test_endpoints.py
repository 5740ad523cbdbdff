"""The endpoint rule (no SSRF): which endpoints callers may contact, and the connector
that enforces it again below every caller-side session."""

from __future__ import annotations

import aiohttp
import pytest

from agent.discovery.endpoints import EndpointRefused, GuardedConnector, endpoint_refusal


@pytest.mark.parametrize("endpoint", [
    "https://abc.trycloudflare.com", "https://10.0.0.1/", "https://gpu.example.org:8443/x",
    "http://127.0.0.1:8090", "http://127.9.8.7:1/base", "http://[::1]:8090", "http://localhost",
])
def test_allowed(endpoint: str) -> None:
    assert endpoint_refusal(endpoint) is None


@pytest.mark.parametrize("endpoint,why", [
    ("http://10.0.0.1/", "plain http to 10.0.0.1"),
    ("http://169.254.169.254/latest", "plain http"),
    ("http://gpu.lan:9000", "plain http"),
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
def test_refused(endpoint: str, why: str) -> None:
    reason = endpoint_refusal(endpoint)
    assert reason is not None and why in reason, reason


def test_allow_http_hosts_lets_a_lan_host_through() -> None:
    assert endpoint_refusal("http://gpu.lan:9000", ["GPU.lan"]) is None
    assert endpoint_refusal("http://192.168.1.5/", ["192.168.1.5"]) is None
    assert endpoint_refusal("http://192.168.1.6/", ["192.168.1.5"]) is not None


async def test_connector_refuses_and_counts_without_connecting() -> None:
    conn = GuardedConnector(lambda: ())
    async with aiohttp.ClientSession(connector=conn) as s:
        with pytest.raises(EndpointRefused):
            await s.get("http://10.0.0.1/x")
        with pytest.raises(EndpointRefused):
            await s.get("http://10.0.0.1:80/redirected")
    assert conn.contacts["10.0.0.1"] == 2 and conn.refused == 2
