"""``rma-agent join``: finding the inference servers already running on this box.

Each well-known server listens on a default local port and answers a cheap, distinctive
GET; join probes those ports on loopback with short timeouts and offers what answers:

| kind      | default port(s) | probe (what must answer)                                   |
|-----------|-----------------|------------------------------------------------------------|
| vllm      | 8000            | ``GET /version`` -> ``{"version"}`` and ``/v1/models``      |
| triton    | 8000            | ``GET /v2`` -> ``{"name": "triton", ...}``                  |
| llamacpp  | 8080            | ``GET /props`` -> ``{"default_generation_settings", ...}``  |
| tgi       | 8080, 3000      | ``GET /info`` -> ``{"model_id", ...}``                      |
| ollama    | 11434           | ``GET /api/version`` -> ``{"version"}``                     |

Why probes and not process names: the server may run in a container or as another user;
what matters is that it answers where the gateway will send requests. A port that
answers none of these (the agent's own admin API on 8080, say) is not offered. The ports
are a parameter (``detect(ports=...)``) so tests run stub servers on free ports.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

PROBE_TIMEOUT = 1.0
LOCAL_HOST = "127.0.0.1"

# port -> the kinds that use it by default, in probe order
DEFAULT_PORTS: dict[int, tuple[str, ...]] = {
    8000: ("vllm", "triton"),
    8080: ("llamacpp", "tgi"),
    3000: ("tgi",),
    11434: ("ollama",),
}
ALL_KINDS = ("vllm", "triton", "llamacpp", "tgi", "ollama")
LLM_KINDS = ("vllm", "llamacpp", "tgi", "ollama")
# the health path each kind answers 200 on once it can serve (when the config cannot
# name the kind itself, the gateway checks this path instead)
HEALTH_PATH = {"vllm": "/health", "triton": "/v2/health/ready", "llamacpp": "/health",
               "tgi": "/health", "ollama": "/api/version"}


@dataclass(frozen=True)
class Found:
    """One inference server that answered its kind's probe."""

    kind: str
    url: str            # base URL the gateway forwards to, e.g. http://127.0.0.1:8000
    detail: str = ""    # model or version, for the printout

    @property
    def default_service(self) -> str:
        """The service name offered for it: ``llm-inference`` (SPEC's example) for
        LLM servers, the kind itself otherwise."""
        return "llm-inference" if self.kind in LLM_KINDS else self.kind


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    """The JSON answer of a 200 GET, or None (refused, timed out, not JSON, not 200)."""
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(256 * 1024)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _first_model(models: Any) -> str:
    data = models.get("data") if isinstance(models, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return str(data[0].get("id", ""))[:80]
    return ""


async def _probe_kind(session: aiohttp.ClientSession, base: str, kind: str) -> Found | None:
    """``Found`` when ``base`` answers ``kind``'s probe."""
    if kind == "vllm":
        version = await _get_json(session, base + "/version")
        models = await _get_json(session, base + "/v1/models")
        if isinstance(version, dict) and "version" in version and isinstance(models, dict):
            model = _first_model(models)
            return Found(kind, base, f"vLLM {version['version']}" + (f", {model}" if model else ""))
        return None
    if kind == "triton":
        meta = await _get_json(session, base + "/v2")
        if isinstance(meta, dict) and str(meta.get("name", "")).lower() == "triton":
            return Found(kind, base, f"Triton {meta.get('version', '')}".strip())
        return None
    if kind == "llamacpp":
        props = await _get_json(session, base + "/props")
        if isinstance(props, dict) and ("default_generation_settings" in props
                                         or "total_slots" in props):
            model = str(props.get("model_path", ""))[-80:]
            return Found(kind, base, "llama.cpp server" + (f", {model}" if model else ""))
        return None
    if kind == "tgi":
        info = await _get_json(session, base + "/info")
        if isinstance(info, dict) and "model_id" in info:
            return Found(kind, base, f"TGI {info.get('version', '')}, {info['model_id']}"[:120])
        return None
    if kind == "ollama":
        version = await _get_json(session, base + "/api/version")
        if isinstance(version, dict) and "version" in version:
            return Found(kind, base, f"Ollama {version['version']}")
        return None
    raise ValueError(f"unknown kind {kind!r}")


async def probe_url(base: str, kinds: tuple[str, ...] = ALL_KINDS,
                    per_request: float = PROBE_TIMEOUT,
                    session: aiohttp.ClientSession | None = None) -> Found | None:
    """The first of ``kinds`` that ``base`` answers as (tried one after the other: two
    kinds share a port, and the first match wins), or None."""
    own = session is None
    if session is None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=per_request))
    try:
        for kind in kinds:
            found = await _probe_kind(session, base.rstrip("/"), kind)
            if found is not None:
                return found
        return None
    finally:
        if own:
            await session.close()


async def detect(ports: Mapping[int, tuple[str, ...]] | None = None, host: str = LOCAL_HOST,
                 per_request: float = PROBE_TIMEOUT) -> list[Found]:
    """Every server found on ``host`` at ``ports`` (default ``DEFAULT_PORTS``), in port
    order; ports probed concurrently, each with ``per_request`` seconds per request."""
    table = DEFAULT_PORTS if ports is None else ports
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=per_request)) as session:
        results = await asyncio.gather(*(
            probe_url(f"http://{host}:{port}", kinds, per_request, session)
            for port, kinds in sorted(table.items())))
    return [f for f in results if f is not None]
