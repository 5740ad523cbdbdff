"""Pure parts of the gateway proxy: which headers cross, what the upstream URL is."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from agent.config import Upstream
from agent.gateway.proxy import forward_headers, target_url

# The hop-by-hop and path rules themselves are agent.http.forwarding's, tested for both
# proxies in tests/http/test_forwarding.py.

class _Transport:
    """Just enough of a transport for ``request.remote``."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("192.0.2.7", 41000) if name == "peername" else default


def test_forward_headers_append_and_drop_host_and_length() -> None:
    req = make_mocked_request("POST", "/ocr/x", transport=_Transport(), headers=CIMultiDict([
        ("Host", "w.example.org"), ("Content-Length", "3"), ("Expect", "100-continue"),
        ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", 'for="[2001:db8::1]"'), ("X-Forwarded-Proto", "https"),
        ("Authorization", "Bearer t")]))
    out = forward_headers(req)
    assert "Host" not in out and "Content-Length" not in out and "Expect" not in out
    peer = "192.0.2.7"
    assert req.remote == peer
    assert out["X-Forwarded-For"] == f"198.51.100.1, 10.0.0.1, {peer}"
    assert out["Forwarded"] == (f'for="[2001:db8::1]", for={peer};proto=http;'
                                'host="w.example.org"')
    assert out["X-Forwarded-Host"] == "w.example.org"
    assert out["X-Forwarded-Proto"] == "https"          # the caller's own is kept
    assert out["Authorization"] == "Bearer t"           # end-to-end: passed on


def test_target_url_keeps_the_callers_encoding_and_the_upstream_prefix() -> None:
    up = Upstream("http://127.0.0.1:9000")
    assert str(target_url(up, "/ocr/v1/run?x=%2F&y=1")) == "http://127.0.0.1:9000/v1/run?x=%2F&y=1"
    assert str(target_url(up, "/ocr/a%20b/%2F")) == "http://127.0.0.1:9000/a%20b/%2F"
    assert str(target_url(up, "/ocr")) == "http://127.0.0.1:9000"
    assert str(target_url(up, "/ocr/")) == "http://127.0.0.1:9000/"
    assert str(target_url(up, "/ocr?q")) == "http://127.0.0.1:9000/?q"
    pre = Upstream("https://gpu.local:8443/api")
    assert str(target_url(pre, "/llm/chat?stream=1")) == "https://gpu.local:8443/api/chat?stream=1"

