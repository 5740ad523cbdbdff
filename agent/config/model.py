"""The configuration model (SPEC §4): the frozen dataclasses ``load_config`` returns,
their defaults, and the fixed vocabularies and limits the validators check against.

This is the contract every other module codes against; it imports nothing from the rest
of the package so that importing a section type never pulls in the parser.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path("/etc/rma-agent/agent.toml")
ENV_PATH = "RMA_AGENT_CONFIG"

# GPU class table, best first. Scores are in [0, 1]; unknown names fall back to memory.
DEFAULT_GPU_SCORES: dict[str, float] = {
    "H200": 1.0, "H100": 0.9, "A100": 0.8, "L40S": 0.7, "A10": 0.6,
    "V100": 0.5, "RTX 4090": 0.4, "RTX 3090": 0.3, "T4": 0.2, "CPU": 0.0,
}


@dataclass(frozen=True)
class Address:
    """A ``host:port`` pair; host may be an IPv4/IPv6 literal or a name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentSection:
    role: str = "worker"                   # "worker" | "coordinator"
    name: str = field(default_factory=socket.gethostname)
    region: str = ""
    state_dir: Path = Path("/var/lib/rma-agent")


@dataclass(frozen=True)
class DHTSection:
    listen: Address = Address("0.0.0.0", 8468)
    bootstrap: tuple[str, ...] = ()        # "ip:port", "host:port" or "https://.../api/dht/bootstrap"
    mode: str = "auto"                     # "server" | "client" | "auto"
    ksize: int = 20
    alpha: int = 3
    record_ttl: int = 300
    republish_interval: int = 30


@dataclass(frozen=True)
class HTTPSection:
    listen: Address = Address("127.0.0.1", 8080)
    # peers (IPs or CIDR networks) whose CF-Connecting-IP / X-Forwarded-For / X-Real-IP
    # headers name the real client; e.g. ["127.0.0.1", "::1"] for cloudflared on this box
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Upstream:
    """Where the gateway forwards one service: ``url`` (http(s), may carry a path prefix),
    the path its health check GETs ("" = the kind's own health endpoint, or the base URL
    itself for ``generic``), the server's ``kind`` (whose own health and load the gateway
    reads: ``agent.gateway.kinds``) and, for Prometheus kinds, where its metrics are
    ("" = the kind's default)."""

    url: str
    health: str = ""
    kind: str = "generic"
    metrics_url: str = ""

    @property
    def origin(self) -> str:
        """``scheme://host:port`` of ``url``: a server's own endpoints (``/health``,
        ``/metrics``, ``/slots``) live at its root, whatever path prefix ``url`` has."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def health_url(self) -> str:
        """The URL the health checker GETs: the base URL + ``health``; without one, the
        kind's own health endpoint at the server's root, or (generic) the base URL."""
        if self.health:
            return self.url.rstrip("/") + self.health
        path = KIND_HEALTH.get(self.kind, "")
        return self.origin + path if path else self.url


@dataclass(frozen=True)
class GatewaySection:
    """The public face (SPEC §5): what the tunnel or a TLS proxy publishes."""

    listen: Address = Address("127.0.0.1", 8090)
    max_body_mb: int = 100                 # request bodies above this are refused (413)
    upstream_timeout: float = 300.0        # seconds the upstream may stay silent (read timeout)
    upstreams: dict[str, Upstream] = field(default_factory=dict)   # service -> upstream

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 1024 * 1024


@dataclass(frozen=True)
class WorkerSection:
    services: tuple[str, ...] = ()
    endpoint: str = ""                     # public base URL; "" = learned from the tunnel
    max_concurrency: int = 4
    admission_cert: str = ""               # path of the certificate from `rma-agent admit`
    gpu: str | None = None                 # None = detect through NVML
    gpu_memory_gb: float | None = None


@dataclass(frozen=True)
class NetworkSection:
    """Closed networks: the admission authorities' Ed25519 public keys (base64), and a
    coordinator's issuer certificate (it enrolls and renews workers with it)."""

    admission_keys: tuple[str, ...] = ()   # [] = open network
    issuer_cert: str = ""                  # coordinator: path of `rma-agent admit --issuer`'s file

    @property
    def admission_public_keys(self) -> tuple[bytes, ...]:
        """The keys as 32 raw bytes each (validated when the config was loaded)."""
        return tuple(base64.b64decode(k) for k in self.admission_keys)


@dataclass(frozen=True)
class TunnelSection:
    mode: str = "off"                      # "off" | "quick" | "named"
    metrics: Address = Address("127.0.0.1", 20241)
    hostname: str = ""


@dataclass(frozen=True)
class DiscoverySection:
    cache_ttl: int = 60
    coordinators: tuple[str, ...] = ()
    max_results: int = 50
    max_attempts: int = 3                  # router: tries per request
    allow_http_hosts: tuple[str, ...] = ()  # hosts whose plain-http endpoints may be contacted
    # loopback/private/link-local destinations callers may contact (IPs, CIDRs or names)
    allow_private_hosts: tuple[str, ...] = ()
    gpu_scores: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GPU_SCORES))


@dataclass(frozen=True)
class LogSection:
    level: str = "info"                    # debug | info | warning | error


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    dht: DHTSection = field(default_factory=DHTSection)
    http: HTTPSection = field(default_factory=HTTPSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    tunnel: TunnelSection = field(default_factory=TunnelSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None             # file it was loaded from, if any


class ConfigError(Exception):
    """One or more configuration errors; ``errors`` holds lines ``PATH:LINE: key: msg``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def default_path() -> Path:
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


ROLES = ("worker", "coordinator")
DHT_MODES = ("server", "client", "auto")
TUNNEL_MODES = ("off", "quick", "named")
LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
UPSTREAM_KEYS = ("url", "health", "kind", "metrics_url")   # keys of an inline-table upstream
# what serves an upstream: its own health and load are read for every kind but generic
UPSTREAM_KINDS = ("generic", "vllm", "llamacpp", "tgi", "ollama", "triton")
# each kind's own health endpoint (at the server's root); 2xx = ready
KIND_HEALTH = {"vllm": "/health", "llamacpp": "/health", "tgi": "/health",
               "ollama": "/api/version", "triton": "/v2/health/ready"}
# kinds whose load is Prometheus text (they may name their metrics_url)
METRICS_KINDS = ("vllm", "llamacpp", "tgi", "triton")
MAX_BODY_MB = 1024 * 1024                  # gateway.max_body_mb upper bound (1 TiB)
MAX_UPSTREAM_TIMEOUT = 86400.0             # seconds
MAX_ATTEMPTS = 10                          # discovery.max_attempts upper bound

# Known keys per section; the order is the order ``dump_toml`` writes them in.
SCHEMA: dict[str, tuple[str, ...]] = {
    "agent": ("role", "name", "region", "state_dir"),
    "dht": ("listen", "bootstrap", "mode", "ksize", "alpha", "record_ttl", "republish_interval"),
    "http": ("listen", "trusted_proxies"),
    "gateway": ("listen", "max_body_mb", "upstream_timeout", "upstreams"),
    "worker": ("services", "endpoint", "max_concurrency", "admission_cert", "gpu",
               "gpu_memory_gb"),
    "network": ("admission_keys", "issuer_cert"),
    "tunnel": ("mode", "metrics", "hostname"),
    "discovery": ("cache_ttl", "coordinators", "max_results", "max_attempts",
                  "allow_http_hosts", "allow_private_hosts", "gpu_scores"),
    "log": ("level",),
}
