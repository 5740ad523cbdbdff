"""The forwarding rules (agent.http.forwarding), run through both proxies that use them:
the worker's gateway and the caller's router must agree on every header and every path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from agent.gateway import proxy as gateway_proxy
from agent.http.forwarding import HOP_BY_HOP, end_to_end, path_refusal
from agent.router import proxy as router_proxy

HOSTILE = [("Connection", "X-A, close"), ("connection", "x-b"), ("X-A", "1"), ("X-B", "2"),
           ("Close", "?"), ("Keep-Alive", "5"), ("TE", "trailers"),
           ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
           ("Proxy-Authenticate", "y"), ("Proxy-Connection", "z"), ("Trailer", "X-T"),
           ("Trailers", "X-T"), ("X-Keep", "a"), ("X-Keep", "b"),
           ("Content-Type", "text/plain")]
KEPT = [("X-Keep", "a"), ("X-Keep", "b"), ("Content-Type", "text/plain")]


class _Transport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("192.0.2.7", 41000) if name == "peername" else default


def _gateway_request(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    req = make_mocked_request("GET", "/svc/x", headers=headers, transport=_Transport())
    return [(k, v) for k, v in gateway_proxy.forward_pairs(req)
            if not k.lower().startswith(("x-forwarded", "forwarded"))]


def _router_request(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    return list(router_proxy.request_headers(CIMultiDictProxy(headers), None).items())


def _gateway_response(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    return list(end_to_end(headers).items())        # what gateway.proxy applies to answers


def _router_response(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    return list(router_proxy.response_headers(CIMultiDictProxy(headers)).items())


@pytest.mark.parametrize("forward", [_gateway_request, _router_request, _gateway_response,
                                     _router_response],
                         ids=["gateway-request", "router-request", "gateway-response",
                              "router-response"])
def test_both_proxies_drop_the_same_hop_by_hop_headers(
        forward: Callable[[CIMultiDict[str]], list[tuple[str, str]]]) -> None:
    out = forward(CIMultiDict(HOSTILE))
    assert out == KEPT
    assert not {k.lower() for k, _ in out} & (HOP_BY_HOP | {"x-a", "x-b", "close"})


def test_gateway_uses_the_shared_rule() -> None:
    """One rule: the gateway module holds no copy of its own."""
    assert gateway_proxy.end_to_end is end_to_end
    assert gateway_proxy.HOP_BY_HOP is HOP_BY_HOP
    assert not hasattr(router_proxy, "HOP_BY_HOP") and not hasattr(router_proxy,
                                                                   "dot_segments")


ESCAPES = [
    "/www/../secret.txt", "/www/a/%2e%2E/b", "/www/./x", "/www/%2E", "/www/x/..?q=1",
    "/www/..%2fsecret.txt", "/www/..%2Fsecret.txt", "/www/%2e%2e%2fsecret.txt",
    "/www/%2E%2E%2Fsecret.txt", "/www/%2e%2e/secret.txt", "/www/..%5csecret.txt",
    "/www/..\\secret.txt", "/www/a%2f..%2f..%2fsecret.txt", "/www/%252e%252e%252fsecret.txt",
    "/www/..%252fsecret.txt", "/www/%c0%ae%c0%ae%c0%afsecret.txt", "/www/..;/secret.txt",
    "/www/.%2e/secret.txt", "/www/secret.txt%00.png", "/www/%2f..%2fsecret.txt",
    "/www/x%5c..%5c..%5csecret.txt", "/www/..%2F", "/www/%2E%2E",
]
ORDINARY = ["/www/a..b/.hidden", "/www/x?path=../y", "/www/...", "/www/%2e%2e%2e",
            "/www/a%20b/c%3Fd", "/www/x?q=%2f..%2f", "/www/", "/www", "/www/caf%C3%A9",
            "/www/.well-known/x", "/www/a;b=c/d", "/www/v1/models/org%2Fmodel",
            "/www/a/b%20c/%2Fx", "/www/a%5Cb", "/www/%2F%2F"]


@pytest.mark.parametrize("path", ESCAPES)
def test_paths_that_could_leave_the_prefix_are_refused(path: str) -> None:
    assert path_refusal(path) is not None, path
    assert path_refusal(path.removeprefix("/www")) is not None    # the router's `rest`


@pytest.mark.parametrize("path", ORDINARY)
def test_ordinary_paths_pass(path: str) -> None:
    assert path_refusal(path) is None, path
