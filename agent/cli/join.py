"""``sudo rma-agent join URL [--token T] [--service NAME=URL]... [--force]`` (SPEC §3):
one command from a fresh ``apt install rma-agent`` to a worker the network finds.

Steps, each printed as it happens (the parts live in join_system / join_net /
join_detect / join_config):

1. the identity in ``state_dir`` (made now if missing, owned by the service user);
2. the coordinator's seed list (``GET URL/api/dht/bootstrap``): proves the URL is a
   coordinator before anything is written;
3. closed network (``--token``): enrollment at ``POST URL/api/network/enroll``, the
   certificate written to ``state_dir/admission.cert`` (where the daemon's renewal can
   replace it) and the network's keys into ``network.admission_keys``; skipped when the
   certificate already there is valid for this key and these services;
4. the GPU (NVML) and the inference servers on their default local ports
   (``--service`` names them instead; their kind is still detected);
5. the config (``-c``, default /etc/rma-agent/agent.toml): written by join_config's
   ownership rule (an edited file needs ``--force``, which keeps a backup), validated
   with check-config's code first;
6. ``systemctl enable rma-agent`` and a restart when the config changed (not with
   ``--no-start``: then the operator starts it);
7. waits (``--timeout``, 60 s) until a DHT lookup through the coordinator returns this
   worker, then prints how to check on it.

Idempotent: the same arguments again find the same identity, a still-valid certificate
and the same config text, so nothing is written and the unit is not restarted.
Exit codes: 0 joined, 1 runtime failure (coordinator unreachable, not found in time),
2 bad usage (bad argument, refused token, edited config without --force).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import agent.cli.join_config as join_config
from agent.cli.join_config import JoinError, JoinPlan, Upstream

CERT_FILE = "admission.cert"
DEFAULT_STATE = "/var/lib/rma-agent"
DEFAULT_TIMEOUT = 60.0
CLOUDFLARED_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")


def add_parser(sub: argparse._SubParsersAction,
               config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("join", help="join this box to a network as a worker (one command)")
    sp.add_argument("url", help="the coordinator's public URL, e.g. https://coord-1.example.org")
    sp.add_argument("--token", default=None, help="enrollment token (closed networks)")
    sp.add_argument("--service", action="append", default=[], metavar="NAME=[KIND+]URL",
                    help="a service and its local server, e.g. ocr=http://127.0.0.1:9000 "
                         "or llm=vllm+http://127.0.0.1:8000 (repeatable; default: what is "
                         "found on the default local ports)")
    sp.add_argument("--force", action="store_true",
                    help="replace a config join did not write (a backup is kept)")
    config_arg(sp)
    sp.add_argument("--name", default=None, help="worker name (default: host name)")
    sp.add_argument("--region", default="", help="free-text region, e.g. eu-west")
    sp.add_argument("--endpoint", default="", metavar="URL",
                    help="public URL of this box's gateway (default: a cloudflared quick "
                         "tunnel)")
    sp.add_argument("--state-dir", default=None, type=Path, metavar="DIR",
                    help=f"identity and certificate directory (default {DEFAULT_STATE})")
    sp.add_argument("--dht-listen", default="0.0.0.0:8468", metavar="HOST:PORT")
    sp.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                    help="the admin API (default 127.0.0.1:8080, or the next free port "
                         "when an inference server uses 8080)")
    sp.add_argument("--gateway-listen", default=None, metavar="HOST:PORT",
                    help="the gateway (default 127.0.0.1:8090, likewise)")
    sp.add_argument("--no-start", action="store_true",
                    help="leave systemd alone: start the agent yourself (join still "
                         "waits for it to be found unless --timeout 0)")
    sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                    help="seconds to wait until the network finds this worker (0: no wait)")


def _say(msg: str) -> None:
    print(f"join: {msg}", flush=True)


def parse_service(text: str) -> tuple[str, Upstream]:
    """``NAME=URL`` or ``NAME=KIND+URL`` -> (name, Upstream); JoinError(2) when bad."""
    import agent.cli.join_detect as join_detect
    from agent.config import SERVICE_RE
    from agent.config.validate import check_url
    from agent.dht.record import normalize_service

    name, sep, rest = text.partition("=")
    name = normalize_service(name.strip())
    if not sep or not SERVICE_RE.fullmatch(name):
        raise JoinError(f"--service {text!r}: expected NAME=URL with a service name of "
                        "lowercase a-z, 0-9, '.', '_', '-'", 2)
    kind, plus, url = rest.partition("+")
    if not plus or "://" in kind:
        kind, url = "", rest
    if kind and kind not in join_detect.ALL_KINDS:
        raise JoinError(f"--service {text!r}: unknown kind {kind!r} (one of "
                        f"{', '.join(join_detect.ALL_KINDS)})", 2)
    why = check_url(url)
    if why:
        raise JoinError(f"--service {text!r}: the URL {why}", 2)
    return name, Upstream(url.rstrip("/"), kind, join_detect.HEALTH_PATH.get(kind, ""))


def coordinator_url(text: str) -> str:
    from agent.config.validate import check_url

    url = text.strip().rstrip("/")
    why = check_url(url)
    if why:
        raise JoinError(f"URL {text!r} {why}", 2)
    return url


async def _services(args: argparse.Namespace) -> dict[str, Upstream]:
    """The services to serve: ``--service`` (kinds detected when not given) or what
    answers on the default local ports."""
    import agent.cli.join_detect as join_detect

    if args.service:
        out: dict[str, Upstream] = {}
        for text in args.service:
            name, up = parse_service(text)
            if name in out:
                raise JoinError(f"--service {name}: given twice", 2)
            if not up.kind:
                found = await join_detect.probe_url(up.url)
                if found is not None:
                    up = Upstream(up.url, found.kind, join_detect.HEALTH_PATH[found.kind])
            out[name] = up
            _say(f"service {name} -> {up.url}" + (f" ({up.kind})" if up.kind else ""))
        return out
    found = await join_detect.detect()
    out = {}
    for f in found:
        name = f.default_service
        if name in out:
            name = f"{name}-{f.kind}"
        if name not in out:
            out[name] = Upstream(f.url, f.kind, join_detect.HEALTH_PATH[f.kind])
            _say(f"found {f.detail or f.kind} at {f.url}: serving it as {name!r}")
    if not out:
        ports = ", ".join(f"{p} ({'/'.join(k)})" for p, k in sorted(join_detect.DEFAULT_PORTS.items()))
        raise JoinError("no inference server answers on the default local ports "
                        f"[{ports}]: start yours, or name it with --service NAME=URL", 2)
    return out


def _tunnel(args: argparse.Namespace) -> tuple[str, str]:
    """(worker.endpoint, tunnel.mode): ``--endpoint`` (no tunnel), else a quick tunnel,
    which needs cloudflared."""
    if args.endpoint:
        from agent.config.validate import check_url
        why = check_url(args.endpoint)
        if why:
            raise JoinError(f"--endpoint {args.endpoint!r} {why}", 2)
        return args.endpoint.rstrip("/"), "off"
    if os.environ.get("RMA_CLOUDFLARED") or shutil.which("cloudflared") or any(
            Path(d, "cloudflared").exists() for d in CLOUDFLARED_DIRS):
        return "", "quick"
    raise JoinError("no public endpoint: cloudflared is not installed (it publishes this "
                    "box's gateway through a quick tunnel: see "
                    "https://pkg.cloudflare.com), or give --endpoint URL", 2)


def _listen(given: str | None, default_port: int, taken: set[int]) -> str:
    """``given``, else 127.0.0.1 on ``default_port`` or the next port no upstream of this
    box uses (llama.cpp and TGI default to 8080, the admin API's own default)."""
    if given:
        return given
    port = default_port
    while port in taken:
        port += 1
    if port != default_port:
        _say(f"port {default_port} is an inference server's: the agent listens on "
             f"127.0.0.1:{port} instead")
    return f"127.0.0.1:{port}"


def _local_ports(services: dict[str, Upstream]) -> set[int]:
    ports = set()
    for up in services.values():
        u = urllib.parse.urlsplit(up.url)
        if u.hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
            ports.add(u.port or (443 if u.scheme == "https" else 80))
    return ports


def _plain_http_hosts(url: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(allow_http_hosts, allow_private_hosts) this worker needs to reach a coordinator
    at a plain-http or private address (LANs, tests)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    http = (host,) if url.startswith("http://") else ()
    try:
        ip = ipaddress.ip_address(host)
        private = (host,) if (ip.is_private or ip.is_loopback) else ()
    except ValueError:
        private = ()
    return http, private


def run(args: argparse.Namespace) -> int:
    """``rma-agent join``; exit code."""
    t0 = time.monotonic()
    try:
        return asyncio.run(_join(args, t0))
    except JoinError as exc:
        for line in str(exc).splitlines():
            print(f"rma-agent join: {line}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("rma-agent join: interrupted", file=sys.stderr)
        return 1


async def _join(args: argparse.Namespace, t0: float) -> int:
    import agent.cli.join_net as join_net
    import agent.cli.join_system as join_system
    from agent.config import default_path

    url = coordinator_url(args.url)
    if args.timeout < 0:
        raise JoinError("--timeout must be 0 or more", 2)
    path = Path(args.config or default_path())
    state_dir = (args.state_dir or Path(DEFAULT_STATE)).absolute()
    name = args.name or socket.gethostname()
    join_config.check_writable(path, force=args.force)
    endpoint, tunnel = _tunnel(args)
    services = await _services(args)
    identity, created = join_system.ensure_identity(state_dir)
    _say(f"identity {identity.node_id.hex()} ({'created' if created else 'kept'} in "
         f"{state_dir})")
    seeds = await join_net.fetch_seeds(url)
    _say(f"coordinator {url} answers: {len(seeds)} seed(s) ({', '.join(seeds[:3])}"
         f"{', ...' if len(seeds) > 3 else ''})")
    http_hosts, private_hosts = _plain_http_hosts(url)
    taken = _local_ports(services)
    http_listen = _listen(args.http_listen, 8080, taken)
    gateway_listen = _listen(args.gateway_listen, 8090,
                             taken | {int(http_listen.rsplit(":", 1)[1])})
    plan = JoinPlan(coordinator=url, name=name, services=services, state_dir=str(state_dir),
                    region=args.region, endpoint=endpoint, tunnel=tunnel,
                    dht_listen=args.dht_listen, http_listen=http_listen,
                    gateway_listen=gateway_listen, allow_http_hosts=http_hosts,
                    allow_private_hosts=private_hosts)
    plan = await _admission(args, plan, path, identity, state_dir)
    _say(f"GPU: {_gpu_line()}")
    text = join_config.render(plan, path)
    result = join_config.write_config(path, text, force=args.force)
    _say(f"config {path}: {result.action}"
         + (f" (the previous file is kept as {result.backup})" if result.backup else ""))
    if args.no_start:
        _say(f"--no-start: start it yourself: systemctl enable --now rma-agent "
             f"(or rma-agent run -c {path})")
    else:
        _say(join_system.start_unit(result.action != "unchanged"))
    if args.timeout == 0:
        return 0
    return await _wait(url, seeds, identity.node_id, next(iter(services)), args.timeout, t0,
                       plan, path)


def _gpu_line() -> str:
    from agent.config import WorkerSection
    from agent.gpu import detect_gpu

    gpu = detect_gpu(WorkerSection())
    return "none found through NVML: a CPU worker" if gpu.name == "CPU" else (
        f"{gpu.name}, {gpu.memory_gb:g} GB")


async def _admission(args: argparse.Namespace, plan: JoinPlan, path: Path, identity: Any,
                     state_dir: Path) -> JoinPlan:
    """The plan with the closed network's certificate and keys: kept when the ones
    already here are valid for this key and these services, else enrolled with
    ``--token``; an open network (no token, nothing kept) has none."""
    from dataclasses import replace

    import agent.cli.join_net as join_net
    import agent.cli.join_system as join_system

    cert_path = state_dir / CERT_FILE
    kept = _kept_admission(path, plan, identity, cert_path)
    if kept is not None:
        _say(f"closed network: the certificate in {cert_path} is still valid: not "
             "enrolling again")
        return kept
    info = await join_net.network_info(plan.coordinator)
    closed = info.get("closed") if info is not None else None
    if closed is False:
        _say("the network is open: no enrollment" + (" (--token not needed)"
                                                     if args.token else ""))
        return plan
    if not args.token:
        if closed:
            raise JoinError(f"the network of {plan.coordinator} is closed: give the "
                            "enrollment token its operator made (--token T; they make one "
                            "with 'rma-agent token create')", 2)
        _say("no --token: joining as an open network (closed networks need an "
             "enrollment token from their operator)")
        return plan
    enrolled = await join_net.enroll(plan.coordinator, identity, args.token, plan.name,
                                     list(plan.services))
    join_system.write_state_file(state_dir, CERT_FILE, (enrolled.certificate + "\n").encode())
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(enrolled.not_after))
    _say(f"enrolled: certificate until {until} in {cert_path}; network keys "
         f"{', '.join(k[:12] + '...' for k in enrolled.network_keys)}")
    return replace(plan, admission_cert=str(cert_path), admission_keys=enrolled.network_keys)


def _kept_admission(path: Path, plan: JoinPlan, identity: Any, cert_path: Path
                    ) -> JoinPlan | None:
    """The plan with the admission settings of the config already there (join's, or
    one edited since: ``--force`` must not cost a token), when its certificate is still
    valid for this identity and these services; else None."""
    from dataclasses import replace

    from agent.admission.settings import certificate_state
    from agent.config import ConfigError, load_config, parse_config

    if not cert_path.exists():
        return None
    try:
        old = load_config(path)
    except (ConfigError, OSError):
        return None
    if not old.network.admission_keys or old.worker.admission_cert != str(cert_path):
        return None
    candidate = replace(plan, admission_cert=str(cert_path),
                        admission_keys=tuple(old.network.admission_keys))
    try:
        cfg = parse_config(join_config.render(candidate, path), path)
    except ConfigError:
        return None
    blob, errors, _warnings = certificate_state(cfg, identity.public_key)
    return candidate if blob and not errors else None


async def _wait(url: str, seeds: list[str], worker_id: bytes, service: str, wait_s: float,
                t0: float, plan: JoinPlan, config: Path) -> int:
    import agent.cli.join_net as join_net

    _say(f"waiting until the network finds this worker for {service!r} "
         f"(up to {wait_s:g} s)")
    found = await join_net.wait_found(url, seeds, worker_id, service, wait_s, _say)
    if found is None:
        print(f"rma-agent join: not found by the network within {wait_s:g} s; the agent "
              "says why in: rma-agent status; journalctl -u rma-agent -n 50"
              + ("" if plan.admission_keys else
                 " (a closed network needs --token)"), file=sys.stderr)
        return 1
    how, endpoint = found
    _say(f"found by the network ({how}) at {endpoint}, {time.monotonic() - t0:.1f} s "
         "after join started")
    print("\nCheck on it with:\n"
          "  rma-agent status\n"
          f"  rma-agent lookup {service}\n"
          "  journalctl -u rma-agent -f\n"
          f"Edit {config} to change what it serves, then: "
          "rma-agent check-config && systemctl reload rma-agent", flush=True)
    return 0
