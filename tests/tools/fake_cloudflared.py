#!/usr/bin/env python3
"""A STAND-IN for ``cloudflared``, used only by tests.

It exists because the real ``cloudflared`` binary cannot be downloaded in the build and
test environment (no internet, and it is not in Debian's archive), and because a real
quick tunnel needs Cloudflare's edge. It opens no tunnel and reaches no network: it only
imitates the parts of cloudflared that rma-agent talks to, so the agent's tunnel watcher
and the systemd unit ``rma-tunnel.service`` can be exercised end to end:

* the command line shape
  ``fake_cloudflared.py [--no-autoupdate] [--metrics HOST:PORT] tunnel [--config FILE]
  [--url URL] [run [NAME]]`` (global flags may also follow ``tunnel``; unknown flags
  such as ``--loglevel info`` or ``--protocol=quic`` are accepted and ignored);
* the metrics server on ``--metrics`` (default ``127.0.0.1:20241`` as in cloudflared):
  ``GET /ready`` -> 200 ``{"status":200,"readyConnections":4,"connectorId":"..."}`` once
  "connected" to the edge, else 503 with ``readyConnections`` 0;
  ``GET /quicktunnel`` -> ``{"hostname":"<words>.trycloudflare.com"}`` in quick mode
  (``--url`` without ``run``); 404 in named mode (``run [NAME]`` or ``--config`` alone);
  ``GET /healthcheck`` -> ``OK``; ``GET /metrics`` -> a few Prometheus lines;
* the tunnel itself, reduced to a local "edge": an HTTP listener (``FAKE_CLOUDFLARED_EDGE``,
  default ``127.0.0.1:0``) that relays every request to the ``--url`` origin the way
  cloudflared relays requests for the public hostname — original ``Host`` kept,
  ``Cf-Connecting-Ip`` / ``X-Forwarded-For`` / ``X-Forwarded-Proto: https`` added, hop-by-hop
  headers dropped, the answer streamed back — so a test can send a request "through the
  tunnel" to whatever the launcher made the origin. ``GET /fake/edge`` on the metrics
  server tells where it listens: ``{"url": ..., "origin": ..., "hostname": ...}``. (The
  real cloudflared has no such endpoint; it is the stand-in's test hook.) A named tunnel
  given ``--url`` next to ``ingress:`` rules in its ``--config`` fails like cloudflared;
* log lines on stderr in cloudflared's console format (``2026-11-25T10:00:00Z INF ...``);
* exit status 0 on SIGTERM / SIGINT (graceful shutdown), 1 when the metrics address
  cannot be bound, 2 on a command line it cannot run.

Knobs for tests:

* ``FAKE_CLOUDFLARED_READY_DELAY`` (seconds, default 0): time before ``/ready`` turns 200.
* ``FAKE_CLOUDFLARED_EDGE=HOST:PORT``: where the stand-in edge listens.
* ``FAKE_CLOUDFLARED_NAMED_QUICKTUNNEL=empty``: in named mode answer ``/quicktunnel`` with
  200 ``{"hostname":""}`` (what current cloudflared releases do) instead of 404.
* SIGUSR1: pick a new quick-tunnel hostname (what a restarted quick tunnel looks like).
* SIGUSR2: toggle the edge connection (``/ready`` 503 <-> 200) without stopping.

Standard library only (Python >= 3.11): the systemd/nspawn test runs it in a bare Debian.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "2024.11.0-fake"
DEFAULT_METRICS = "127.0.0.1:20241"

# Flags of cloudflared that take a value (so "--loglevel info" is one flag, not a flag
# and a positional). Anything unknown written as "--flag=value" is fine too.
VALUE_FLAGS = {
    "metrics", "config", "url", "loglevel", "transport-loglevel", "logfile", "log-directory",
    "protocol", "token", "token-file", "pidfile", "edge-ip-version", "ha-connections",
    "origincert", "credentials-file", "cred-file", "hostname", "name", "grace-period",
    "region", "retries", "metrics-update-freq", "label", "tag", "edge-bind-address",
    "proxy-dns-port", "proxy-dns-address", "output", "management-hostname",
    "max-fetch-size", "compression-quality", "autoupdate-freq", "icmpv4-src", "icmpv6-src",
    "http-host-header", "origin-server-name", "unix-socket", "service-op-ip",
}

WORDS = (
    "amber anchor apple arena atlas bamboo basin beacon birch blossom canyon cedar comet coral "
    "cotton crystal delta desert dolphin ember falcon fern fjord forest galaxy garnet glacier "
    "harbor hazel horizon island jasmine lagoon lantern maple meadow meteor mosaic nebula "
    "oasis orchid pebble pepper prairie quartz raven river saffron sierra summit tundra "
    "velvet willow"
).split()


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"}


def log(level: str, msg: str) -> None:
    """One line in cloudflared's console format, e.g. ``2026-11-25T10:00:00Z INF ...``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sys.stderr.write(f"{stamp} {level} {msg}\n")
    sys.stderr.flush()


def random_hostname() -> str:
    return "-".join(random.sample(WORDS, 4)) + ".trycloudflare.com"


class Usage(Exception):
    """A command line the stand-in cannot run (exit 2, like a CLI usage error)."""


def parse_args(argv: list[str]) -> dict[str, object]:
    """cloudflared's shape: global flags, ``tunnel``, tunnel flags, optional ``run [NAME]``."""
    opts: dict[str, object] = {"flags": {}, "positional": []}
    flags: dict[str, str | bool] = opts["flags"]  # type: ignore[assignment]
    positional: list[str] = opts["positional"]  # type: ignore[assignment]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1:])
            break
        if arg.startswith("-") and arg != "-":
            name = arg.lstrip("-")
            if "=" in name:
                name, value = name.split("=", 1)
                flags[name] = value
            elif name in VALUE_FLAGS:
                if i + 1 >= len(argv):
                    raise Usage(f"flag needs an argument: --{name}")
                flags[name] = argv[i + 1]
                i += 1
            elif name in ("v", "version"):
                flags["version"] = True
            else:
                flags[name] = True      # unknown boolean flag: ignored, like a noop
            i += 1
            continue
        positional.append(arg)
        i += 1
    return opts


def parse_metrics(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise Usage(f"--metrics must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class State:
    """What the metrics server reports; changed from signal handlers."""

    def __init__(self, mode: str, ready_delay: float, named_empty: bool) -> None:
        self.mode = mode
        self.started = time.monotonic()
        self.ready_delay = ready_delay
        self.named_empty = named_empty
        self.hostname = random_hostname() if mode == "quick" else ""
        self.connector_id = str(uuid.uuid4())
        self.edge_down = False
        self.edge_url = ""
        self.origin = ""
        self.lock = threading.Lock()

    def ready_connections(self) -> int:
        if self.edge_down or time.monotonic() - self.started < self.ready_delay:
            return 0
        return 4


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cloudflared-fake"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """No access log: cloudflared does not print one either."""

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with state.lock:
                conns = state.ready_connections()
                hostname = state.hostname
            if path == "/ready":
                status = 200 if conns else 503
                body = {"status": status, "readyConnections": conns,
                        "connectorId": state.connector_id}
                self._send(status, json.dumps(body, separators=(",", ":")).encode())
            elif path == "/quicktunnel":
                if state.mode == "quick":
                    self._send(200, json.dumps({"hostname": hostname}, separators=(",", ":")).encode())
                elif state.named_empty:
                    self._send(200, b'{"hostname":""}')
                else:
                    self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            elif path == "/fake/edge":
                body = {"url": state.edge_url, "origin": state.origin, "hostname": hostname}
                self._send(200, json.dumps(body).encode())
            elif path == "/healthcheck":
                self._send(200, b"OK\n", "text/plain; charset=utf-8")
            elif path == "/metrics":
                text = ("# HELP cloudflared_tunnel_ha_connections Number of active ha connections\n"
                        "# TYPE cloudflared_tunnel_ha_connections gauge\n"
                        f"cloudflared_tunnel_ha_connections {conns}\n")
                self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")

        do_HEAD = do_GET

    return Handler


def make_edge_handler(state: State) -> type[BaseHTTPRequestHandler]:
    """The stand-in for Cloudflare's edge + the connector: relays requests to the origin."""

    class Edge(BaseHTTPRequestHandler):
        server_version = "cloudflare"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """No access log."""

        def _plain(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes | None:
            length = self.headers.get("Content-Length")
            if length is not None:
                return self.rfile.read(int(length))
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return None

        def relay(self) -> None:
            if state.edge_down or not state.origin:
                self._plain(502, "stand-in edge: the tunnel has no origin or no edge connection")
                return
            body = self._body()
            named = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in HOP_BY_HOP | named | {"content-length"}}
            peer = self.client_address[0]
            xff = self.headers.get("X-Forwarded-For")
            headers["Cf-Connecting-Ip"] = peer
            headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
            headers["X-Forwarded-Proto"] = "https"
            origin = urllib.parse.urlsplit(state.origin)
            conn = http.client.HTTPConnection(origin.hostname, origin.port or 80, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                self._plain(502, f"stand-in edge: origin {state.origin} unreachable: {e}")
                conn.close()
                return
            try:
                self.send_response(resp.status, resp.reason)
                rnamed = {t.strip().lower()
                          for t in (resp.getheader("Connection") or "").split(",")}
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP | rnamed:
                        self.send_header(k, v)
                chunked = (resp.getheader("Content-Length") is None
                           and self.command != "HEAD" and resp.status not in (204, 304))
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked
                                     else chunk)
                    self.wfile.flush()
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = relay

    return Edge


def config_has_ingress(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.split("#", 1)[0].rstrip().startswith("ingress:") for line in f)
    except OSError:
        return False


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
        flags: dict[str, str | bool] = opts["flags"]  # type: ignore[assignment]
        positional: list[str] = opts["positional"]  # type: ignore[assignment]
        if flags.get("version") or positional[:1] == ["version"]:
            print(f"cloudflared version {VERSION} (stand-in, see tests/tools/fake_cloudflared.py)")
            return 0
        if positional[:1] != ["tunnel"]:
            raise Usage("only the 'tunnel' command is imitated")
        rest = positional[1:]
        if rest and rest[0] != "run":
            raise Usage(f"unsupported tunnel subcommand {rest[0]!r}")
        run = bool(rest)
        name = rest[1] if len(rest) > 1 else ""
        if run or ("config" in flags and "url" not in flags):
            mode = "named"
        elif "url" in flags or "hello-world" in flags:
            mode = "quick"
        else:
            raise Usage("give --url URL (quick tunnel) or run [NAME] (named tunnel)")
        host, port = parse_metrics(str(flags.get("metrics", DEFAULT_METRICS)))
        edge_host, edge_port = parse_metrics(os.environ.get("FAKE_CLOUDFLARED_EDGE")
                                             or "127.0.0.1:0")
    except Usage as e:
        log("ERR", f"{e}")
        return 2
    if mode == "named" and "url" in flags and "config" in flags \
            and config_has_ingress(str(flags["config"])):
        log("ERR", "You can't set the --url flag (or $TUNNEL_URL) when using multiple-origin "
                   "ingress rules")
        return 1

    delay = float(os.environ.get("FAKE_CLOUDFLARED_READY_DELAY", "0") or 0)
    state = State(mode, delay, os.environ.get("FAKE_CLOUDFLARED_NAMED_QUICKTUNNEL") == "empty")
    # Handlers first: once the metrics server answers, a test may signal us at once (a
    # SIGUSR1 before the handler exists would kill the stand-in).
    stop = threading.Event()
    stop_sig: list[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        stop_sig.append(signal.Signals(signum).name)
        stop.set()

    def on_usr1(_signum: int, _frame: object) -> None:
        if state.mode != "quick":
            log("WRN", "SIGUSR1: not a quick tunnel, hostname unchanged")
            return
        with state.lock:
            state.hostname = random_hostname()
        log("INF", f"quick Tunnel hostname is now https://{state.hostname}")

    def on_usr2(_signum: int, _frame: object) -> None:
        with state.lock:
            state.edge_down = not state.edge_down
        if state.edge_down:
            log("ERR", "Connection terminated error=\"stand-in: edge connection dropped\" connIndex=0")
        else:
            log("INF", "Registered tunnel connection connIndex=0 location=fake protocol=quic")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    log("INF", f"Starting tunnel tunnelID={state.connector_id if mode == 'named' else ''}")
    log("INF", f"Version {VERSION} (stand-in: no tunnel is opened)")
    if "no-autoupdate" not in flags:
        log("INF", "Autoupdate is enabled (ignored by the stand-in)")
    if mode == "quick":
        log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
        log("INF", "+" + "-" * 60 + "+")
        log("INF", "|  Your quick Tunnel has been created! Visit it at:")
        log("INF", f"|  https://{state.hostname}")
        log("INF", "+" + "-" * 60 + "+")
    else:
        log("INF", f"Running named tunnel {name or '(from config)'}"
                   + (f" config={flags['config']}" if "config" in flags else ""))

    try:
        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer((host, port), make_handler(state))
    except OSError as e:
        log("ERR", f"failed to bind metrics server on {host}:{port}: {e.strerror or e}")
        return 1
    server.daemon_threads = True
    bound = server.server_address
    log("INF", f"Starting metrics server on {bound[0]}:{bound[1]}/metrics")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    state.origin = str(flags.get("url", "") or "")
    try:
        edge = ThreadingHTTPServer((edge_host, edge_port), make_edge_handler(state))
    except OSError as e:
        log("ERR", f"stand-in edge: cannot bind {edge_host}:{edge_port}: {e.strerror or e}")
        return 1
    edge.daemon_threads = True
    state.edge_url = f"http://{edge.server_address[0]}:{edge.server_address[1]}"
    log("INF", f"stand-in edge {state.edge_url} relays to origin {state.origin or '(none)'}")
    threading.Thread(target=edge.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()


    announced = False
    while not stop.wait(0.05):
        if not announced and state.ready_connections():
            for i in range(4):
                log("INF", f"Registered tunnel connection connIndex={i} "
                           f"connection={uuid.uuid4()} event=0 ip=127.0.0.1 location=fake "
                           "protocol=quic")
            announced = True
    log("INF", f"Initiating graceful shutdown due to signal {stop_sig[0] if stop_sig else '?'} ...")
    server.shutdown()
    server.server_close()
    edge.shutdown()
    edge.server_close()
    log("INF", "Tunnel server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
