"""``rma-agent join``: talking to the coordinator -- its seed list, enrollment, and the
wait until the network finds this worker.

"Found" is checked the way any caller would find the worker, not by asking the local
agent (whose own DHT storage always holds its own record): a throwaway DHT client node
(fresh key, client mode, so it enters nobody's routing table) bootstraps from the
coordinator's seeds and looks the service up; the worker counts as found when a record
with its id and a non-empty endpoint comes back. The coordinator's public registry
(``GET URL/api/registry/{service}``, where workers whose UDP is blocked register) is
asked too, so a worker that reached the network only through that fallback counts.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.cli.join_config import JoinError

HTTP_TIMEOUT = 10.0
POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class Enrolled:
    """What the coordinator answered an enrollment with."""

    certificate: str                 # one base64 line: the worker.admission_cert file
    not_after: int
    network_keys: tuple[str, ...]


async def fetch_seeds(url: str) -> list[str]:
    """The coordinator's seed list (``GET URL/api/dht/bootstrap``); JoinError(1) when it
    cannot be had -- nothing can join through a coordinator that does not answer."""
    from agent.dht.bootstrap import SeedError, fetch_seed_url

    full = url + "/api/dht/bootstrap"
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session:
            seeds = await fetch_seed_url(full, session)
    except SeedError as exc:
        raise JoinError(f"the coordinator's seed list: {exc}", 1) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise JoinError(f"cannot reach the coordinator at {url}: "
                        f"{str(exc) or type(exc).__name__}", 1) from None
    if not seeds:
        raise JoinError(f"{full} lists no seeds: the coordinator is not serving its DHT "
                        "address (is its dht.listen reachable from here?)", 1)
    return seeds


async def network_info(url: str) -> dict[str, Any] | None:
    """``GET URL/api/network/enroll``: whether the network is closed and this coordinator
    enrolls (``{"closed", "enroll", "network_keys", ...}``); None when it does not say
    (an older coordinator, or an error: enrollment will then tell)."""
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session, \
                session.get(url + "/api/network/enroll", allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("closed"), bool) else None


async def enroll(url: str, identity: Any, token: str, name: str,
                 services: list[str]) -> Enrolled:
    """Enroll this box's key with ``token`` at ``URL/api/network/enroll`` (proof of
    possession: the request is signed with the identity key); the certificate issued,
    checked to be for this key and to chain to the network keys the answer names.
    JoinError: 2 for a refused token (the user must bring another), 1 for what may
    pass later (unreachable, rate-limited, coordinator trouble)."""
    from agent.admission.enrollment import (
        ENROLL_PATH,
        MAX_ENROLL_NAME,
        EnrollError,
        build_enroll_request,
        parse_response,
    )
    from agent.admission.keys import b64_key

    short = name.encode("utf-8")[:MAX_ENROLL_NAME].decode("utf-8", "ignore")
    body = build_enroll_request(identity, token, name=short, services=services)
    full = url + ENROLL_PATH
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session, \
                session.post(full, json=body, allow_redirects=False) as resp:
            raw = await resp.content.read(64 * 1024)
            status, retry = resp.status, resp.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise JoinError(f"cannot reach the coordinator at {url}: "
                        f"{str(exc) or type(exc).__name__}", 1) from None
    if status == 404:
        raise JoinError(f"{full}: not found: is {url} a coordinator (its gateway URL) of "
                        "a closed network?", 1)
    try:
        answer = parse_response(status, bytes(raw), public_key=identity.public_key,
                                retry_after=retry)
    except EnrollError as exc:
        if exc.status == 429:
            raise JoinError(f"enrollment refused for now: {exc.message}; try again in "
                            f"{exc.retry_after or 60:g} s", 1) from None
        code = 2 if 400 <= exc.status < 500 else 1
        raise JoinError(f"enrollment refused: {exc.message} (HTTP {exc.status})", code) \
            from None
    return Enrolled(answer.file_text().strip(), answer.not_after,
                    tuple(b64_key(k) for k in answer.network_keys))


async def _registry_has(session: aiohttp.ClientSession, url: str, service: str,
                        worker_id: bytes) -> str | None:
    """The endpoint the coordinator's registry holds for ``worker_id``, or None."""
    from agent.dht.record import RecordError, WorkerRecord

    try:
        async with session.get(f"{url}/api/registry/{service}") as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    for item in (data.get("records") or []) if isinstance(data, dict) else []:
        try:
            rec = WorkerRecord.decode(base64.b64decode(item))
        except (RecordError, ValueError, TypeError):
            continue
        if rec.worker_id == worker_id and rec.endpoint and not rec.withdrawn:
            return rec.endpoint
    return None


async def wait_found(url: str, seeds: list[str], worker_id: bytes, service: str,
                     wait_s: float, progress: Callable[[str], None] | None = None
                     ) -> tuple[str, str] | None:
    """Poll until the network returns this worker for ``service``: (how, endpoint), or
    None after ``wait_s`` seconds."""
    from agent.dht.bootstrap import resolve_seeds
    from agent.dht.identity import Identity
    from agent.dht.server import DHTNode

    deadline = time.monotonic() + wait_s
    node = DHTNode(Identity.generate(), mode="client")
    await node.listen(0, "0.0.0.0")
    said = ""
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=min(HTTP_TIMEOUT, max(wait_s, 1.0)))) as session:
            while True:
                if node.peers() == 0:
                    addrs = (await resolve_seeds(seeds)).addrs
                    await node.bootstrap(addrs)
                for rec in await node.find_providers(service) if node.peers() else []:
                    if rec.worker_id == worker_id and rec.endpoint and not rec.withdrawn:
                        return "dht lookup", rec.endpoint
                endpoint = await _registry_has(session, url, service, worker_id)
                if endpoint:
                    return "coordinator registry", endpoint
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                msg = (f"not found yet ({node.peers()} DHT peers); "
                       f"waiting up to {left:.0f} s more")
                if progress is not None and msg.split(";")[0] != said:
                    said = msg.split(";")[0]
                    progress(msg)
                await asyncio.sleep(min(POLL_INTERVAL, left))
    finally:
        node.stop()
