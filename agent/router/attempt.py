"""One attempt of a routed request at one worker, up to the worker's answer head.

Kept apart from :mod:`agent.router.component` (which picks, retries and learns) because
its rule is the router's half of "timeouts bound silence, never length":

- the connection must open within ``connect_timeout_s``;
- the answer's head must come within ``upstream_timeout_s`` of *silence* after the
  request went out (aiohttp's ``sock_read``: it starts once the body is written and
  restarts on every packet), and within ``connect_timeout_s + upstream_timeout_s`` in
  all — counted from the last body byte forwarded, so a worker cannot trickle its head
  forever while an upload that keeps coming is never cut for its length (each streamed
  chunk restarts that budget: :attr:`agent.router.proxy.Body.progress`);
- the answer's body is then read with the same ``sock_read``: a silence longer than
  ``upstream_timeout_s`` between two chunks ends it, a stream that keeps sending may last
  as long as it likes (:mod:`agent.router.relay`).

A cancelled attempt (the caller hung up) leaves nothing behind: aiohttp closes the
connection of a request cancelled before its head, and :class:`ClosingResponse` aborts it
when the answer is dropped unread, so the worker sees its caller go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from agent.discovery.endpoints import EndpointRefused
from agent.router.proxy import Body


class AttemptFailed(Exception):
    """One attempt failed in a way that may allow a retry."""

    def __init__(self, reason: str, detail: str, *, sent: bool, charged: bool) -> None:
        super().__init__(detail)
        self.reason = reason        # a RETRY_REASONS label
        self.sent = sent            # the request (or part of it) may have reached the worker
        self.charged = charged      # a retry after this costs retry budget


async def send(session: aiohttp.ClientSession, method: str, url: URL,
               headers: CIMultiDict[str], body: Body, *, connect_timeout_s: float,
               upstream_timeout_s: float) -> aiohttp.ClientResponse:
    """Send one attempt and wait for the answer's head (rules above); failures as
    :class:`AttemptFailed`, a cancellation propagates."""
    limits = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                   sock_read=upstream_timeout_s)
    budget = connect_timeout_s + upstream_timeout_s
    try:
        async with asyncio.timeout(budget) as deadline:
            body.progress = _restarter(deadline, budget)
            try:
                return await session.request(
                    method, url, headers=headers, data=body.payload(),
                    allow_redirects=False, timeout=limits, compress=None, chunked=None)
            finally:
                body.progress = None
    except asyncio.CancelledError:
        raise
    except EndpointRefused as exc:
        raise AttemptFailed("connect", str(exc), sent=False, charged=False) from None
    except aiohttp.ClientConnectorError as exc:
        raise AttemptFailed("connect", f"cannot connect: {exc.os_error or exc}",
                            sent=False, charged=False) from None
    except (aiohttp.ServerTimeoutError, TimeoutError):
        raise AttemptFailed("timeout", "no response headers in time", sent=True,
                            charged=True) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise AttemptFailed("disconnect", f"connection failed: {exc or type(exc).__name__}",
                            sent=True, charged=True) from None


def _restarter(deadline: asyncio.Timeout, budget: float) -> Callable[[], None]:
    """What a streamed request body calls per chunk: the attempt's ``budget`` starts
    again (only silence counts)."""
    loop = asyncio.get_running_loop()

    def restart() -> None:
        if not deadline.expired():
            deadline.reschedule(loop.time() + budget)
    return restart
