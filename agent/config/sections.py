"""One reader per TOML section: ``doc`` -> the section's frozen dataclass.

``parse_config`` calls them in a fixed order (the order errors of one line are listed
in); a reader that checks a key against another section takes that section's value
as an argument, so the dependency is visible in the call.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from agent import limits as rec
from agent.config.locator import KeyPath
from agent.config.model import (
    DEFAULT_GPU_SCORES,
    DHT_MODES,
    LOG_LEVELS,
    MAX_ATTEMPTS,
    MAX_BODY_MB,
    MAX_UPSTREAM_TIMEOUT,
    ROLES,
    SERVICE_RE,
    TUNNEL_MODES,
    Address,
    AgentSection,
    DHTSection,
    DiscoverySection,
    GatewaySection,
    HTTPSection,
    LogSection,
    NetworkSection,
    TunnelSection,
    Upstream,
    WorkerSection,
)
from agent.config.upstreams import upstream_entry
from agent.config.validate import (
    _address,
    _Checker,
    _got,
    _section,
    _show,
    check_host,
    check_url,
    parse_address,
)


def _anchor(spath: str, base_dir: Path | None) -> Path:
    """The directory relative paths in the config are taken relative to."""
    if base_dir is not None:
        return base_dir
    return Path(spath).resolve().parent if spath != "<config>" else Path.cwd()


def _path(raw: str, spath: str, base_dir: Path | None) -> str:
    """``raw`` with ``~`` expanded, anchored (see ``_anchor``) when relative, normalised."""
    p = Path(raw).expanduser()
    if not p.is_absolute():
        p = _anchor(spath, base_dir) / p
    return os.path.normpath(p)


def agent_section(ck: _Checker, doc: dict[str, Any], spath: str,
                  base_dir: Path | None) -> AgentSection:
    """``[agent]``: role, name (default: the host name), region, state directory."""
    s = _section(ck, doc, "agent")
    role = ck.choice(s, ("agent", "role"), "worker", ROLES)
    name = (ck.string(s, ("agent", "name"), "", max_len=rec.MAX_NAME, allow_empty=False)
            or socket.gethostname())
    region = ck.string(s, ("agent", "region"), "", max_len=rec.MAX_REGION)
    state_raw = ck.string(s, ("agent", "state_dir"), "/var/lib/rma-agent", max_len=4096,
                          allow_empty=False)
    return AgentSection(role=role, name=name, region=region,
                        state_dir=Path(_path(state_raw, spath, base_dir)))


def _bootstrap_entry(entry: str) -> tuple[str, str | None]:
    """One ``dht.bootstrap`` entry: a ``host:port`` or an http(s) URL."""
    e = entry.strip()
    if e.startswith(("http://", "https://")) or "://" in e:
        why = check_url(e)
        return e, (f"{why}, got {_show(entry)}" if why else None)
    try:
        parse_address(e)
    except ValueError as ex:
        return e, (f'must be "host:port" or an http(s):// URL: {ex}, got {_show(entry)}')
    return e, None


def dht_section(ck: _Checker, doc: dict[str, Any]) -> DHTSection:
    """``[dht]``: listener, bootstrap list, mode and the Kademlia parameters.

    ``alpha`` must not exceed ``ksize``; ``republish_interval`` must be shorter than
    ``record_ttl`` (the error goes on whichever of the two the file sets).
    """
    s = _section(ck, doc, "dht")
    d = DHTSection()
    listen = _address(ck, s, ("dht", "listen"), d.listen)
    boots = ck.unique_list(s, ("dht", "bootstrap"), "198.51.100.7:8468", _bootstrap_entry)
    mode = ck.choice(s, ("dht", "mode"), d.mode, DHT_MODES)
    ksize = ck.integer(s, ("dht", "ksize"), d.ksize, 1, 64)
    alpha = ck.integer(s, ("dht", "alpha"), d.alpha, 1, 16)
    if alpha > ksize:
        ck.err(("dht", "alpha"), f"must not exceed dht.ksize ({ksize}), got {alpha}")
    record_ttl = ck.integer(s, ("dht", "record_ttl"), d.record_ttl, 10, int(rec.MAX_TTL))
    republish = ck.integer(s, ("dht", "republish_interval"), d.republish_interval, 1)
    if republish >= record_ttl:
        if "republish_interval" in s:
            ck.err(("dht", "republish_interval"), f"must be less than dht.record_ttl "
                                                  f"({record_ttl}), got {republish}")
        else:
            ck.err(("dht", "record_ttl"), f"must be greater than dht.republish_interval "
                                          f"({republish}), got {record_ttl}")
    return DHTSection(listen=listen, bootstrap=tuple(boots), mode=mode, ksize=ksize,
                      alpha=alpha, record_ttl=record_ttl, republish_interval=republish)


def _net_list(ck: _Checker, s: dict[str, Any], key: KeyPath, *, names: bool) -> tuple[str, ...]:
    """An array of IP addresses and CIDR networks (``10.0.0.0/8``), and host names when
    ``names``; entries normalised (lowercase, networks in canonical form)."""
    what = ("an IP address, a CIDR network or a host name" if names
            else "an IP address or a CIDR network")

    def entry_of(entry: str) -> tuple[str, str | None]:
        e = entry.strip().lower().removeprefix("[").removesuffix("]")
        try:
            norm = str(ipaddress.ip_network(e, strict=False)) if "/" in e else \
                str(ipaddress.ip_address(e))
        except ValueError:
            norm = e if names and ":" not in e and check_host(e) is None else ""
        return norm, (None if norm else f"must be {what}, got {_show(entry)}")

    return tuple(ck.unique_list(s, key, "127.0.0.1", entry_of))


def http_section(ck: _Checker, doc: dict[str, Any]) -> HTTPSection:
    """``[http]``: the admin API's listener."""
    s = _section(ck, doc, "http")
    return HTTPSection(listen=_address(ck, s, ("http", "listen"), HTTPSection().listen),
                       trusted_proxies=_net_list(ck, s, ("http", "trusted_proxies"), names=False))


def _service_entry(svc: str) -> tuple[str, str | None]:
    """One ``worker.services`` entry: a service name as typed (a hint when only the
    case or surrounding blanks are wrong)."""
    if SERVICE_RE.fullmatch(svc):
        return svc, None
    hint = (f", did you mean '{svc.strip().lower()}'?"
            if SERVICE_RE.fullmatch(svc.strip().lower()) else "")
    return svc, ('must be a service name: 1-63 characters of a-z, 0-9, ".", "_", "-", '
                 f"starting with a letter or digit, got {_show(svc)}{hint}")


def worker_section(ck: _Checker, doc: dict[str, Any], role: str, spath: str,
                   base_dir: Path | None) -> WorkerSection:
    """``[worker]`` (only for ``role = "worker"``): services, endpoint, capacity, GPU,
    admission certificate path."""
    s = _section(ck, doc, "worker")
    if "worker" in doc and role != "worker":
        ck.err(("worker",), f'section is only for role = "worker" (agent.role is "{role}")')
    services = ck.unique_list(s, ("worker", "services"), "ocr", _service_entry)
    if len(services) > rec.MAX_SERVICES:
        ck.err(("worker", "services"), f"at most {rec.MAX_SERVICES} services fit in one signed "
                                       f"record, got {len(services)}")
    if (role == "worker" and not s.get("services") and isinstance(s.get("services", []), list)
            and isinstance(doc.get("worker", {}), dict)):
        ck.err(("worker", "services"), 'a worker must serve at least one service, '
               'e.g. services = ["ocr"]', ("worker",), ("agent", "role"))
    endpoint = ck.string(s, ("worker", "endpoint"), "", max_len=rec.MAX_ENDPOINT).strip()
    if endpoint:
        why = check_url(endpoint)
        if why:
            ck.err(("worker", "endpoint"), f"{why} (or leave it empty to use the tunnel's URL), "
                                           f"got {_show(endpoint)}")
            endpoint = ""
    max_conc = ck.integer(s, ("worker", "max_concurrency"), WorkerSection().max_concurrency,
                          1, 100000)
    gpu: str | None = None
    if "gpu" in s:
        gpu = ck.string(s, ("worker", "gpu"), "", max_len=rec.MAX_GPU, allow_empty=False) or None
    mem: float | None = None
    if "gpu_memory_gb" in s:
        mem = ck.number(s["gpu_memory_gb"], ("worker", "gpu_memory_gb"), 0, None)
    cert = ck.string(s, ("worker", "admission_cert"), "", max_len=4096).strip()
    if cert:
        cert = _path(cert, spath, base_dir)
    return WorkerSection(services=tuple(services), endpoint=endpoint,
                         max_concurrency=max_conc, admission_cert=cert, gpu=gpu,
                         gpu_memory_gb=mem)


def _admission_key_entry(entry: str) -> tuple[str, str | None]:
    """One ``network.admission_keys`` entry: base64 of a 32-byte Ed25519 public key."""
    k = entry.strip()
    try:
        raw = base64.b64decode(k, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is not None and len(raw) == 32:
        return k, None
    what = "is not base64" if raw is None else f"decodes to {len(raw)} bytes"
    return k, ("must be the base64 of a 32-byte Ed25519 public key (from `rma-agent "
               f"network-key create`); it {what}, got {_show(entry)}")


def network_section(ck: _Checker, doc: dict[str, Any], role: str = "worker",
                    spath: str = "<config>", base_dir: Path | None = None) -> NetworkSection:
    """``[network]``: the admission keys that close the network (none: it is open), and
    a coordinator's issuer certificate path (what is in the file: ``check-config``)."""
    s = _section(ck, doc, "network")
    keys = ck.unique_list(s, ("network", "admission_keys"),
                          "base64 of a 32-byte Ed25519 public key", _admission_key_entry)
    issuer = ck.string(s, ("network", "issuer_cert"), "", max_len=4096).strip()
    if issuer:
        if role != "coordinator":
            ck.err(("network", "issuer_cert"), 'only a coordinator issues certificates '
                   f'(agent.role is "{role}"): remove it, or set role = "coordinator"')
        elif not s.get("admission_keys"):
            ck.err(("network", "issuer_cert"), "an issuer certificate needs a closed network: "
                   "list the key that signed it in network.admission_keys")
        issuer = _path(issuer, spath, base_dir)
    return NetworkSection(admission_keys=tuple(keys), issuer_cert=issuer)


def tunnel_section(ck: _Checker, doc: dict[str, Any], role: str, endpoint: str,
                   http_listen: Address) -> TunnelSection:
    """``[tunnel]``: mode, metrics listener, and the host name a named tunnel needs.

    Cross-checks: a worker with both an explicit ``worker.endpoint`` and a tunnel has
    two public URLs; the metrics listener must not be the admin API's.
    """
    s = _section(ck, doc, "tunnel")
    t = TunnelSection()
    tmode = ck.choice(s, ("tunnel", "mode"), t.mode, TUNNEL_MODES)
    metrics = _address(ck, s, ("tunnel", "metrics"), t.metrics)
    hostname = ck.string(s, ("tunnel", "hostname"), "", max_len=253).strip()
    if hostname:
        why = ("must be a bare host name without scheme or path, e.g. \"worker-1.example.org\""
               if "/" in hostname or ":" in hostname else check_host(hostname))
        if why:
            ck.err(("tunnel", "hostname"), f"{why}, got {_show(hostname)}")
            hostname = ""
        elif tmode != "named":
            ck.err(("tunnel", "hostname"), f'is only used with tunnel.mode = "named" '
                                           f'(mode is "{tmode}")')
    if tmode == "named" and not hostname and "hostname" not in s:
        ck.err(("tunnel", "hostname"), 'is required when tunnel.mode = "named" (the public '
               "host name routed to this tunnel)", ("tunnel", "mode"))
    elif tmode == "named" and not hostname and isinstance(s.get("hostname"), str) \
            and not s["hostname"].strip():
        ck.err(("tunnel", "hostname"), 'is required when tunnel.mode = "named" (the public '
               "host name routed to this tunnel)")
    if endpoint and tmode != "off" and role == "worker":
        ck.err(("worker", "endpoint"), f'is set while tunnel.mode = "{tmode}": which public '
               'URL wins is ambiguous; set endpoint = "" to use the tunnel\'s URL, or '
               'tunnel.mode = "off"')
    if metrics == http_listen:
        ck.err(("tunnel", "metrics"), f"must differ from http.listen ({http_listen})")
    return TunnelSection(mode=tmode, metrics=metrics, hostname=hostname)


def _same_socket(a: Address, b: Address) -> bool:
    """Whether two listen addresses would fight over one port (a wildcard host takes
    the port on every address)."""
    wild = ("0.0.0.0", "::")
    return a.port == b.port and (a.host == b.host or a.host in wild or b.host in wild)


def gateway_section(ck: _Checker, doc: dict[str, Any], role: str, services: tuple[str, ...],
             http_listen: Address, metrics: Address) -> GatewaySection:
    """``[gateway]``: the public listener and, on a worker, each service's upstream.

    An upstream is either a URL string (``ocr = "http://127.0.0.1:9000"``) or an inline
    table naming more (``llm = { url = "http://127.0.0.1:8000", kind = "vllm" }``, a
    ``health`` path, a ``metrics_url``): ``agent.config.upstreams`` reads each entry.
    """
    s = _section(ck, doc, "gateway")
    g = GatewaySection()
    listen = _address(ck, s, ("gateway", "listen"), g.listen)
    if _same_socket(listen, http_listen):
        ck.err(("gateway", "listen"), f"must differ from http.listen ({http_listen}): the "
               "gateway is public, the admin API is not")
    elif _same_socket(listen, metrics):
        ck.err(("gateway", "listen"), f"must differ from tunnel.metrics ({metrics})")
    max_body = ck.integer(s, ("gateway", "max_body_mb"), g.max_body_mb, 1, MAX_BODY_MB)
    timeout = g.upstream_timeout
    if "upstream_timeout" in s:
        t = ck.number(s["upstream_timeout"], ("gateway", "upstream_timeout"), 0, MAX_UPSTREAM_TIMEOUT)
        if t is not None and t <= 0:
            ck.err(("gateway", "upstream_timeout"), f"must be a number of seconds > 0 and "
                   f"<= {MAX_UPSTREAM_TIMEOUT:g}, got {s['upstream_timeout']!r}")
        elif t is not None:
            timeout = t
    upstreams: dict[str, Upstream] = {}
    if "upstreams" in s:
        raw = s["upstreams"]
        if not isinstance(raw, dict):
            ck.err(("gateway", "upstreams"), 'must be a table of service = URL, e.g. '
                   '[gateway.upstreams] ocr = "http://127.0.0.1:9000", '
                   f"got {_got(raw)}")
        elif role != "worker" and raw:
            ck.err(("gateway", "upstreams"), f'is only for role = "worker" (agent.role is '
                                             f'"{role}"): a coordinator proxies no service')
        else:
            for svc, val in raw.items():
                up = upstream_entry(ck, ("gateway", "upstreams", svc), svc, val, services)
                if up is not None:
                    upstreams[svc] = up
    return GatewaySection(listen=listen, max_body_mb=max_body, upstream_timeout=timeout,
                          upstreams=upstreams)


def _coordinator_entry(entry: str) -> tuple[str, str | None]:
    """One ``discovery.coordinators`` entry: an http(s) URL."""
    url = entry.strip()
    why = check_url(url)
    return url, (f"{why}, got {_show(url)}" if why else None)


def _why_not_ip6(host: str) -> str | None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"{host!r} is not a valid IPv6 address"
    return None


def _http_host_entry(entry: str) -> tuple[str, str | None]:
    """One ``discovery.allow_http_hosts`` entry: a host name or IP, lowercased, an IPv6
    literal with or without brackets."""
    h = entry.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    why = _why_not_ip6(h) if ":" in h else check_host(h)
    return h, (f"must be a host name or IP address without scheme or port: {why}, "
               f"got {_show(entry)}" if why else None)


def _gpu_scores(ck: _Checker, s: dict[str, Any]) -> dict[str, float]:
    """``discovery.gpu_scores``: the default table with the file's entries laid over it."""
    scores = dict(DEFAULT_GPU_SCORES)
    if "gpu_scores" not in s:
        return scores
    raw = s["gpu_scores"]
    if not isinstance(raw, dict):
        ck.err(("discovery", "gpu_scores"), 'must be a table of GPU name = score, e.g. '
               f'gpu_scores = {{ "A100" = 0.8 }}, got {_got(raw)}')
        return scores
    for gname, val in raw.items():
        key = ("discovery", "gpu_scores", gname)
        if not gname.strip():
            ck.err(key, "a GPU name must not be empty")
            continue
        f = ck.number(val, key, 0, 1)
        if f is not None:
            scores[gname] = f
    return scores


def discovery_section(ck: _Checker, doc: dict[str, Any]) -> DiscoverySection:
    """``[discovery]``: cache, coordinators, result/attempt caps, plain-http hosts, GPU
    scores."""
    s = _section(ck, doc, "discovery")
    ds = DiscoverySection()
    cache_ttl = ck.integer(s, ("discovery", "cache_ttl"), ds.cache_ttl, 0, 3600)
    coords = ck.unique_list(s, ("discovery", "coordinators"), "https://coord-1.example.org",
                            _coordinator_entry)
    max_results = ck.integer(s, ("discovery", "max_results"), ds.max_results, 1, 1000)
    max_attempts = ck.integer(s, ("discovery", "max_attempts"), ds.max_attempts, 1, MAX_ATTEMPTS)
    allow_hosts = ck.unique_list(s, ("discovery", "allow_http_hosts"), "192.168.1.20",
                                 _http_host_entry)
    scores = _gpu_scores(ck, s)
    private = _net_list(ck, s, ("discovery", "allow_private_hosts"), names=True)
    return DiscoverySection(cache_ttl=cache_ttl, coordinators=tuple(coords),
                            max_results=max_results, max_attempts=max_attempts,
                            allow_http_hosts=tuple(allow_hosts), gpu_scores=scores,
                            allow_private_hosts=private)


def log_section(ck: _Checker, doc: dict[str, Any]) -> LogSection:
    """``[log]``: the level."""
    s = _section(ck, doc, "log")
    return LogSection(level=ck.choice(s, ("log", "level"), "info", LOG_LEVELS))
