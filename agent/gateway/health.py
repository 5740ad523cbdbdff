"""Upstream health checks: which services this worker can really serve right now.

A worker whose GPU server crashed still answers the DHT and the gateway, so without a
check every caller routed there would get a 502. Each upstream is polled every
``INTERVAL`` seconds with ``GET`` on its base URL (healthy: any answer below 500 — a
server that answers 404 at ``/`` is up) or on its configured health path (healthy:
2xx/3xx). An upstream of a known kind (``vllm``, ``llamacpp``, ...) is asked its own
health endpoint (``Upstream.health_url``) and judged by
``agent.gateway.kinds.health_verdict``: 2xx only, and the reason carries the server's
own words — llama.cpp answers ``503 "Loading model"`` while it loads, so a box whose
model is not loaded yet is not announced, and is once it answers 200. ``FAILS_TO_DOWN`` failures in a row mark it down (one slow answer does not
withdraw a service); one success marks it up again. The first check at start counts
fully, so a service whose server is not running is never announced in the first place.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from agent.gateway.kinds import health_verdict

if TYPE_CHECKING:
    from agent.config import Upstream

INTERVAL = 3.0           # seconds between two checks of one upstream
TIMEOUT = 5.0            # per check
FAILS_TO_DOWN = 2        # consecutive failures before a service is withdrawn


@dataclass
class UpstreamState:
    """What the last checks of one service's upstream said."""

    service: str
    upstream: Upstream
    state: str = "unknown"           # "unknown" | "up" | "down"
    error: str = ""
    fails: int = 0
    since: float = 0.0               # time.time() of the last state change
    checks: int = 0

    def to_json(self) -> dict[str, object]:
        return {"url": self.upstream.url, "kind": self.upstream.kind,
                "health_url": self.upstream.health_url,
                "state": self.state, "error": self.error or None,
                "since": self.since or None, "checks": self.checks}


async def check(session: aiohttp.ClientSession, up: Upstream) -> str:
    """"" when ``up`` is healthy, else why not (one short line)."""
    try:
        async with session.get(up.health_url, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            body = await resp.content.read(4096)     # drain a little; never a big body
            if up.kind != "generic":
                why = health_verdict(resp.status, body)
                return f"{why} from {up.health_url}" if why else ""
            ok = (200 <= resp.status < 400) if up.health else resp.status < 500
            return "" if ok else f"HTTP {resp.status} from {up.health_url}"
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        return f"no answer from {up.health_url} within {TIMEOUT:g} s"
    except aiohttp.ClientConnectorError as exc:
        return f"cannot connect to {up.health_url}: {exc.os_error.strerror or exc}"
    except Exception as exc:
        return f"{up.health_url}: {str(exc) or type(exc).__name__}"


def record(st: UpstreamState, why: str, *, first: bool = False) -> bool:
    """Apply one check result; True when the state changed."""
    st.checks += 1
    old = st.state
    if not why:
        st.fails, st.error, st.state = 0, "", "up"
    else:
        st.fails += 1
        st.error = why
        if first or st.fails >= FAILS_TO_DOWN:
            st.state = "down"
    if st.state != old:
        st.since = time.time()
        return True
    return False
