"""The parser: TOML text -> validated ``Config`` (``parse_config``, ``load_config``).

Reads every section with the ``_Checker`` readers, cross-checks keys that depend on
each other, and raises one ``ConfigError`` listing every problem, sorted by line.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path

from agent.config.locator import _Locator
from agent.config.model import (
    DEFAULT_GPU_SCORES,
    DHT_MODES,
    LOG_LEVELS,
    ROLES,
    SCHEMA,
    SERVICE_RE,
    TUNNEL_MODES,
    AgentSection,
    Config,
    ConfigError,
    DHTSection,
    DiscoverySection,
    HTTPSection,
    LogSection,
    TunnelSection,
    WorkerSection,
)
from agent.config.validate import (
    _address,
    _Checker,
    _did_you_mean,
    _got,
    _section,
    _show,
    check_host,
    check_url,
    parse_address,
)
from agent.dht import record as rec

_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)\s*$")


def parse_config(text: str, path: Path | str = "<config>", *,
                 base_dir: Path | None = None) -> Config:
    """Validate TOML ``text`` (as if read from ``path``); raise ``ConfigError``.

    ``base_dir`` anchors a relative ``agent.state_dir`` (default: the file's directory).
    """
    spath = str(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_error(spath, text, str(e))]) from None
    loc = _Locator(text)
    ck = _Checker(spath, loc)

    for name, value in doc.items():
        if name not in SCHEMA:
            kind = "section" if isinstance(value, dict) else "key"
            ck.err((name,), f"unknown {kind}" + _did_you_mean(name, tuple(SCHEMA)))

    # [agent]
    s = _section(ck, doc, "agent")
    role = ck.choice(s, ("agent", "role"), "worker", ROLES)
    name = ck.string(s, ("agent", "name"), "", max_len=rec.MAX_NAME, allow_empty=False) or socket.gethostname()
    region = ck.string(s, ("agent", "region"), "", max_len=rec.MAX_REGION)
    state_raw = ck.string(s, ("agent", "state_dir"), "/var/lib/rma-agent", max_len=4096,
                          allow_empty=False)
    state_dir = Path(state_raw).expanduser()
    if not state_dir.is_absolute():
        anchor = base_dir if base_dir is not None else (
            Path(spath).resolve().parent if spath != "<config>" else Path.cwd())
        state_dir = anchor / state_dir
    agent = AgentSection(role=role, name=name, region=region,
                         state_dir=Path(os.path.normpath(state_dir)))

    # [dht]
    s = _section(ck, doc, "dht")
    d = DHTSection()
    listen = _address(ck, s, ("dht", "listen"), d.listen)
    boots: list[str] = []
    for key, entry in ck.string_list(s, ("dht", "bootstrap"),
                                     "198.51.100.7:8468") or []:
        e = entry.strip()
        if e.startswith(("http://", "https://")) or "://" in e:
            why = check_url(e)
            if why:
                ck.err(("dht", "bootstrap"), f"entry {key[-1] + 1} {why}, got {_show(entry)}", at=key)
                continue
        else:
            try:
                parse_address(e)
            except ValueError as ex:
                ck.err(("dht", "bootstrap"), f'entry {key[-1] + 1} must be "host:port" or an '
                       f"http(s):// URL: {ex}, got {_show(entry)}", at=key)
                continue
        if e in boots:
            ck.err(("dht", "bootstrap"), f"entry {key[-1] + 1} is a duplicate of "
                                         f"{_show(e)}", at=key)
            continue
        boots.append(e)
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
    dht = DHTSection(listen=listen, bootstrap=tuple(boots), mode=mode, ksize=ksize,
                     alpha=alpha, record_ttl=record_ttl, republish_interval=republish)

    # [http]
    s = _section(ck, doc, "http")
    http = HTTPSection(listen=_address(ck, s, ("http", "listen"), HTTPSection().listen))

    # [worker]
    s = _section(ck, doc, "worker")
    w = WorkerSection()
    if "worker" in doc and role != "worker":
        ck.err(("worker",), f'section is only for role = "worker" (agent.role is "{role}")')
    services: list[str] = []
    for key, svc in ck.string_list(s, ("worker", "services"), "ocr") or []:
        if not SERVICE_RE.fullmatch(svc):
            hint = (f", did you mean '{svc.strip().lower()}'?"
                    if SERVICE_RE.fullmatch(svc.strip().lower()) else "")
            ck.err(("worker", "services"), f"entry {key[-1] + 1} must be a service name: 1-63 "
                   'characters of a-z, 0-9, ".", "_", "-", starting with a letter or digit, '
                   f"got {_show(svc)}{hint}", at=key)
        elif svc in services:
            ck.err(("worker", "services"), f"entry {key[-1] + 1} is a duplicate of "
                                           f"{_show(svc)}", at=key)
        else:
            services.append(svc)
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
    max_conc = ck.integer(s, ("worker", "max_concurrency"), w.max_concurrency, 1, 100000)
    gpu: str | None = None
    if "gpu" in s:
        gpu = ck.string(s, ("worker", "gpu"), "", max_len=rec.MAX_GPU, allow_empty=False) or None
    mem: float | None = None
    if "gpu_memory_gb" in s:
        mem = ck.number(s["gpu_memory_gb"], ("worker", "gpu_memory_gb"), 0, None)
    worker = WorkerSection(services=tuple(services), endpoint=endpoint,
                           max_concurrency=max_conc, gpu=gpu, gpu_memory_gb=mem)

    # [tunnel]
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
    if metrics == http.listen:
        ck.err(("tunnel", "metrics"), f"must differ from http.listen ({http.listen})")
    tunnel = TunnelSection(mode=tmode, metrics=metrics, hostname=hostname)

    # [discovery]
    s = _section(ck, doc, "discovery")
    ds = DiscoverySection()
    cache_ttl = ck.integer(s, ("discovery", "cache_ttl"), ds.cache_ttl, 0, 3600)
    coords: list[str] = []
    for key, url in ck.string_list(s, ("discovery", "coordinators"),
                                   "https://coord-1.example.org") or []:
        url = url.strip()
        why = check_url(url)
        if why:
            ck.err(("discovery", "coordinators"), f"entry {key[-1] + 1} {why}, got {_show(url)}", at=key)
        elif url in coords:
            ck.err(("discovery", "coordinators"), f"entry {key[-1] + 1} is a duplicate of "
                                                  f"{_show(url)}", at=key)
        else:
            coords.append(url)
    max_results = ck.integer(s, ("discovery", "max_results"), ds.max_results, 1, 1000)
    scores = dict(DEFAULT_GPU_SCORES)
    if "gpu_scores" in s:
        raw = s["gpu_scores"]
        if not isinstance(raw, dict):
            ck.err(("discovery", "gpu_scores"), 'must be a table of GPU name = score, e.g. '
                   f'gpu_scores = {{ "A100" = 0.8 }}, got {_got(raw)}')
        else:
            for gname, val in raw.items():
                key = ("discovery", "gpu_scores", gname)
                if not gname.strip():
                    ck.err(key, "a GPU name must not be empty")
                    continue
                f = ck.number(val, key, 0, 1)
                if f is not None:
                    scores[gname] = f
    discovery = DiscoverySection(cache_ttl=cache_ttl, coordinators=tuple(coords),
                                 max_results=max_results, gpu_scores=scores)

    # [log]
    s = _section(ck, doc, "log")
    log = LogSection(level=ck.choice(s, ("log", "level"), "info", LOG_LEVELS))

    if ck.errors:
        raise ConfigError(ck.sorted())
    return Config(agent=agent, dht=dht, http=http, worker=worker, tunnel=tunnel,
                  discovery=discovery, log=log,
                  source=Path(spath) if spath != "<config>" else None)


def _syntax_error(path: str, text: str, msg: str) -> str:
    m = _TOML_POS_RE.search(msg)
    if m:
        line = int(m.group(1))
    else:
        # "(at end of document)": the scanner tells where an unterminated value began;
        # otherwise the last non-blank line is where the document went wrong.
        loc = _Locator(text)
        if loc.eof_pos is not None:
            line = loc.line_of_pos(loc.eof_pos)
        else:
            lines = text.rstrip().splitlines()
            line = max(1, len(lines))
    if msg.startswith(("Cannot overwrite a value", "Cannot declare", "Duplicate")):
        msg += " - a key or table is defined twice"
    return f"{path}:{line}: syntax: {msg}"


def load_config(path: Path | str) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}:0: file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}:0: file: not valid UTF-8 (byte 0x{data[e.start]:02x} "
                           f"at offset {e.start})"]) from None
    return parse_config(text, path, base_dir=p.resolve().parent)
