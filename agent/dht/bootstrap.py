"""Turn ``dht.bootstrap`` entries into the ``(ip, port)`` pairs kademlia can use.

Why this exists: kademlia's ``Server.bootstrap`` accepts IP literals only (a host name
raises deep inside the transport), while operators write names and URLs. Three entry
forms are accepted:

- ``ip:port`` / ``[v6]:port`` — used as is;
- ``host:port`` (or a bare ``host``, port 8468) — resolved with ``loop.getaddrinfo`` so a
  slow resolver never blocks the event loop;
- ``http(s)://.../api/dht/bootstrap`` — fetched with aiohttp; the answer is a JSON list
  of ``"ip:port"`` strings or ``{"seeds": [...]}`` (what our own coordinators serve).

The routing-table snapshot a coordinator keeps in ``state_dir/routing.json`` is read and
written here too, so the DHT component can rejoin after a restart without any seeds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomic

log = logging.getLogger("rma_agent.dht")

DEFAULT_PORT = 8468
SNAPSHOT_NAME = "routing.json"
SNAPSHOT_VERSION = 1
MAX_URL_SEEDS = 64          # a bootstrap URL cannot make us ping thousands of addresses
MAX_SNAPSHOT_SEEDS = 64
URL_TIMEOUT = 5.0
RESOLVE_TIMEOUT = 5.0

Addr = tuple[str, int]


class SeedError(ValueError):
    """A bootstrap entry that cannot be parsed (config validation should catch these)."""


@dataclass
class SeedResolution:
    """What one resolution pass produced: usable addresses and, per entry, why not."""

    addrs: list[Addr] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


def parse_hostport(entry: str, default_port: int = DEFAULT_PORT) -> Addr:
    """``"h:p"``, ``"[v6]:p"``, ``"v6"`` or ``"h"`` -> ``(host, port)``; SeedError if malformed."""
    text = entry.strip()
    port_text: str | None
    if not text:
        raise SeedError("empty bootstrap entry")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SeedError(f"{entry!r}: unterminated '['")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise SeedError(f"{entry!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:      # a bare IPv6 literal, no port
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host, port_text = text, None
    if not host:
        raise SeedError(f"{entry!r}: missing host")
    if port_text is None:
        port = default_port
    else:
        try:
            port = int(port_text)
        except ValueError:
            raise SeedError(f"{entry!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise SeedError(f"{entry!r}: port {port} out of range 1-65535")
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _resolve_host(host: str, port: int, family: int) -> list[Addr]:
    if _is_ip(host):
        return [(host, port)]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM),
        timeout=RESOLVE_TIMEOUT)
    out: list[Addr] = []
    for _fam, _type, _proto, _canon, sockaddr in infos:
        pair = (str(sockaddr[0]), int(sockaddr[1]))
        if pair not in out:
            out.append(pair)
    return out


async def fetch_seed_url(url: str, session: Any = None) -> list[str]:
    """GET a bootstrap URL and return its entries (strings), validated for shape only."""
    import aiohttp

    own = session is None
    if own:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=URL_TIMEOUT))
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise SeedError(f"{url}: HTTP {resp.status}")
            try:
                body = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError) as exc:
                raise SeedError(f"{url}: answer is not JSON ({exc})") from None
    finally:
        if own:
            await session.close()
    seeds = body.get("seeds") if isinstance(body, dict) else body
    if not isinstance(seeds, list):
        raise SeedError(f"{url}: expected a JSON list or {{\"seeds\": [...]}}")
    return [s for s in seeds[:MAX_URL_SEEDS] if isinstance(s, str)]


async def resolve_seeds(entries: list[str] | tuple[str, ...], *, family: int = socket.AF_INET,
                        exclude: set[Addr] | None = None) -> SeedResolution:
    """Resolve every entry concurrently; failures are collected, never raised.

    ``exclude`` drops our own address (a coordinator often lists itself among the seeds).
    """
    result = SeedResolution()

    async def one(entry: str) -> None:
        try:
            if is_url(entry):
                for sub in await fetch_seed_url(entry):
                    if is_url(sub):
                        continue        # no recursion into further URLs
                    host, port = parse_hostport(sub)
                    result.addrs.extend(await _resolve_host(host, port, family))
            else:
                host, port = parse_hostport(entry)
                result.addrs.extend(await _resolve_host(host, port, family))
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            result.failures.append(f"{entry}: timed out")
        except Exception as exc:   # resolver/HTTP errors of any kind end up in the reason
            result.failures.append(f"{entry}: {exc}")

    await asyncio.gather(*(one(e) for e in entries))
    seen: set[Addr] = set()
    unique: list[Addr] = []
    for addr in result.addrs:
        if addr in seen or (exclude and addr in exclude):
            continue
        seen.add(addr)
        unique.append(addr)
    result.addrs = unique
    return result


def self_addresses(listen_host: str, port: int) -> set[Addr]:
    """Addresses that reach this node's own UDP socket, to keep it out of its seed list."""
    hosts = {listen_host}
    if listen_host in ("0.0.0.0", "", "::"):
        hosts |= {"127.0.0.1", "::1", "localhost"}
    return {(h, port) for h in hosts}


# ----------------------------------------------------------------- routing snapshot

def snapshot_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / SNAPSHOT_NAME


def save_snapshot(state_dir: Path | str, node_id_hex: str,
                  contacts: list[tuple[str, str, int]]) -> Path:
    """Write ``routing.json`` atomically (temp file + fsync + rename).

    Why atomic: the file is read at the next start; a crash mid-write must leave the old
    snapshot, not a truncated one that would make the coordinator start seedless.
    """
    path = snapshot_path(state_dir)
    data = {
        "version": SNAPSHOT_VERSION,
        "saved_at": time.time(),
        "node_id": node_id_hex,
        "contacts": [{"id": cid, "ip": ip, "port": int(port)} for cid, ip, port in contacts],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(data, indent=1).encode("utf-8"), mode=0o600)


def load_snapshot(state_dir: Path | str) -> list[Addr]:
    """Seeds named by ``routing.json``; [] when absent or unreadable (logged, never fatal)."""
    path = snapshot_path(state_dir)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("dht: cannot read routing snapshot %s: %s", path, exc)
        return []
    try:
        data = json.loads(raw)
        contacts = data["contacts"]
        out: list[Addr] = []
        for c in contacts[:MAX_SNAPSHOT_SEEDS]:
            ip, port = str(c["ip"]), int(c["port"])
            if _is_ip(ip) and 1 <= port <= 65535 and (ip, port) not in out:
                out.append((ip, port))
        return out
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("dht: ignoring malformed routing snapshot %s: %s", path, exc)
        return []
