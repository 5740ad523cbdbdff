"""How much one client may hold of a listener: timeouts, connection caps, head memory.

Before these bounds the listeners ran on aiohttp's defaults: no header-read timeout, a
3,630 s keep-alive, no connection cap. About 16,400 held connections (the unit's
``LimitNOFILE``) used up the process's descriptors, and 1,000 unfinished 1 MB heads took
it from 138 MB to 2.1 GB (issue 20).

**Timeouts** (seconds), compared with what other servers do:

================  ======  ==========================================================
bound             ours    others
================  ======  ==========================================================
whole head        30      nginx ``client_header_timeout`` 60; Apache ``RequestReadTimeout
                          header=20-40``; Go ``ReadHeaderTimeout`` unset by default
keep-alive idle   120     nginx ``keepalive_timeout`` 75; hypercorn/h11 5; Apache 5;
                          cloudflared keeps idle origin connections 90 s — an origin
                          that closes first races its reuse (a 502), so ours is longer
body idle         60      nginx ``client_body_timeout`` 60 (between two reads)
answer unread     60      nginx ``send_timeout`` 60 (between two writes)
================  ======  ==========================================================

A phone on a slow home or mobile link sends a 1-2 kB head in well under a second, even
at 2G rates with a 1 s round trip; 30 s for the whole head leaves room for a stalled
radio. A head dribbled one line every 20 s (slow-loris) is closed at 30 s with a 408.

**Connections.** The caps come from the process's file limit (``RLIMIT_NOFILE``), so the
admin API and the upstreams always have descriptors left: 64 for the process itself
(DHT socket, state files, logs), the admin listener's own cap, and room for outgoing
connections (the router's pool, the gateway's upstreams) are set aside first; the public
listener gets the rest, at most ``PUBLIC_MAX`` (memory, not descriptors, is then the
bound). With the unit's 16,384: admin 1,024; upstreams 2,048; public 10,000, of which at
most 312 from one address (an IPv6 /64 counts as one address). A full listener first
closes its oldest idle or half-sent connection (as nginx reuses keep-alive connections
when it runs out) and refuses the newcomer (503) only when every connection is busy with
a request; a full address does the same among its own connections.

**Heads in memory.** aiohttp's ``max_line_size`` and ``max_field_size`` (8,190 bytes, as
Apache's) and at most 100 header lines, then at most 64 KiB for one whole head (nginx:
4 x 8 KiB) and 32 MiB for all heads in progress together: past that the oldest head in
progress is closed.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

PROCESS_RESERVE = 64            # descriptors for the process itself
PUBLIC_MAX = 10_000             # memory bounds the public listener beyond this
ADDRESS_SHARE = 32              # one address may hold 1/32 of the public listener


@dataclass(frozen=True)
class ListenerLimits:
    """The bounds of one listener (see the module docstring for the numbers' reasons)."""

    head_timeout: float = 30.0          # the whole head, from its first byte (or connect)
    keepalive_timeout: float = 120.0    # idle between two requests
    body_idle_timeout: float = 60.0     # no byte of an unfinished body for this long
    send_timeout: float = 60.0          # the caller does not read the answer for this long
    max_connections: int = 1024
    max_per_address: int = 1024
    max_head_bytes: int = 64 * 1024     # one head in progress
    heads_budget_bytes: int = 32 * 1024 * 1024   # all heads in progress together
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 100

    def sweep_interval(self) -> float:
        """How often deadlines are checked: a quarter of the shortest, 50 ms to 1 s."""
        shortest = min(self.head_timeout, self.keepalive_timeout, self.body_idle_timeout,
                       self.send_timeout)
        return min(1.0, max(0.05, shortest / 4))


def file_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (4,096 when unlimited or unknown)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 4096
    return 4096 if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def listener_limits(nofile: int | None = None) -> tuple[ListenerLimits, ListenerLimits]:
    """(admin, public) limits for a process allowed ``nofile`` descriptors.

    The admin API serves this box (the CLI, the dashboard, routed requests of local
    programs, all from loopback): its per-address cap is its total. The public listener
    faces the internet: one address may hold 1/``ADDRESS_SHARE`` of it."""
    nofile = file_limit() if nofile is None else nofile
    admin_cap = _clamp(nofile // 16, 16, 1024)
    outgoing = _clamp(nofile // 8, 32, 2048)
    public_cap = _clamp(nofile - PROCESS_RESERVE - admin_cap - outgoing, 16, PUBLIC_MAX)
    base = ListenerLimits()
    admin = replace(base, max_connections=admin_cap, max_per_address=admin_cap)
    public = replace(base, max_connections=public_cap,
                     max_per_address=max(8, public_cap // ADDRESS_SHARE))
    return admin, public
