"""A user-space WAN between network namespaces: a TUN delay line (root only).

This kernel has no ``netem``, so delay, jitter and loss are made in user space. Every
host is a network namespace whose only link is a TUN device ``wan0`` holding its address
``10.78.R.H/16`` (the /16 route sends every other host's address into the TUN). One
process — this module run as ``python -m tests.netns.delayline`` — holds the TUN fd of
every namespace (it ``setns()``-es into each to create the device, then back), reads each
IPv4 packet, looks up the destination host from the header and writes the packet to that
host's TUN after the pair's one-way delay plus jitter, or drops it; all on one asyncio
loop with ``call_at`` (nothing sleeps). Delays, jitter and Gilbert-Elliott loss come from
``bench/wan.py``, the model ``bench/scale.py --wan`` uses, so the benchmark and this lab
describe the same network. Packets of one host pair leave in the order they came (jitter
never reorders a TCP stream; the internet mostly does not either).

The same process serves the workers' stand-in upstreams: one listening TCP socket on
127.0.0.1:9000 inside each namespace named with ``--upstream`` (a socket keeps the
namespace it was made in), answering every request with the host's name — one process
for them all instead of one per worker, on a 2-core machine.

Everything dies with the process: the TUN devices are not persistent, and ``WanLab``
deletes its namespaces (per-run prefix) in ``close()``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NET = "10.78"
TUN_NAME = "wan0"
UPSTREAM_PORT = 9000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """None when the lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


# ---------------------------------------------------------------- the delay-line process
@contextmanager
def _in_netns(ns: str) -> Iterator[None]:
    """Run the body inside namespace ``ns`` (this thread), then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


def _open_tun(ns: str) -> int:
    """Create ``wan0`` in ``ns`` and return its fd (non-blocking)."""
    with _in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", TUN_NAME.encode(),
                                                _IFF_TUN | _IFF_NO_PI))
    return fd


def _upstream_socket(ns: str) -> socket.socket:
    with _in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", UPSTREAM_PORT))
        s.listen(64)
        s.setblocking(False)
    return s


async def _serve_upstream(name: str, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 server: every request gets 200 and the host's name."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            body = name.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            ValueError):
        pass
    finally:
        writer.close()


class DelayLine:
    """Reads every TUN, and writes each packet to its destination's TUN later."""

    def __init__(self, wan: Any, fds: list[int], ips: list[str]) -> None:
        self.wan = wan
        self.fds = fds
        self.by_ip = {socket.inet_aton(ip): i for i, ip in enumerate(ips)}
        self.last: dict[tuple[int, int], float] = {}      # FIFO per host pair
        self.packets = self.dropped = self.unknown = self.write_errors = 0
        self.loop = asyncio.get_running_loop()

    def start(self) -> None:
        for i, fd in enumerate(self.fds):
            self.loop.add_reader(fd, self._readable, i)

    def _readable(self, src: int) -> None:
        fd = self.fds[src]
        for _ in range(64):     # drain a burst, then let the loop breathe
            try:
                pkt = os.read(fd, 65535)
            except BlockingIOError:
                return
            except OSError:
                return
            self._forward(src, pkt)

    def _forward(self, src: int, pkt: bytes) -> None:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return                  # IPv6 / router solicitations: not on this network
        dst = self.by_ip.get(pkt[16:20])
        if dst is None or dst == src:
            self.unknown += 1
            return
        self.packets += 1
        delay = self.wan.delay(src, dst)
        if delay is None:
            self.dropped += 1
            return
        now = self.loop.time()
        # strictly after the pair's previous packet: the loop's timer heap does not keep
        # the order of equal deadlines
        at = max(now + delay, self.last.get((src, dst), 0.0) + 1e-6)
        self.last[(src, dst)] = at
        self.loop.call_at(at, self._write, dst, pkt)

    def _write(self, dst: int, pkt: bytes) -> None:
        try:
            os.write(self.fds[dst], pkt)
        except OSError:
            self.write_errors += 1

    def stats(self) -> dict[str, int]:
        return {"packets": self.packets, "dropped": self.dropped, "unknown": self.unknown,
                "write_errors": self.write_errors}


async def _main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from bench.wan import PROFILES, Wan

    hosts = json.loads(args.hosts)      # [[ns, ip, region], ...]
    fds = [_open_tun(ns) for ns, _ip, _r in hosts]
    wan = Wan(PROFILES[args.profile], len(hosts), seed=args.seed,
              regions=[r for _ns, _ip, r in hosts])
    line = DelayLine(wan, fds, [ip for _ns, ip, _r in hosts])
    line.start()
    servers = []
    for ns, name in json.loads(args.upstreams):
        sock = _upstream_socket(ns)
        servers.append(await asyncio.start_server(
            lambda r, w, name=name: _serve_upstream(name, r, w), sock=sock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    stats_path = Path(args.stats)
    while not stop.is_set():
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(line.stats() | {"rtt": wan.rtt_stats(2000)}))
        tmp.replace(stats_path)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    for s in servers:
        s.close()


# ---------------------------------------------------------------- the lab (test side)
class WanLab:
    """Namespaces grouped into regions, joined by one delay-line process.

    ``hosts``: logical name -> region (a region of ``bench/wan.py``). Host ``k`` gets
    ``10.78.<k // 200>.<k % 200 + 10>``; ``upstreams``: the names that get a stand-in
    upstream on 127.0.0.1:9000 in their namespace."""

    def __init__(self, hosts: dict[str, str], profile: str = "global-lossy",
                 upstreams: tuple[str, ...] = (), seed: int = 1) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.hosts: dict[str, str] = {}      # name -> namespace
        self.addrs: dict[str, str] = {}      # name -> IPv4
        self.region = dict(hosts)
        self._namespaces: list[str] = []
        self.seed = seed
        self.proc: subprocess.Popen[str] | None = None
        self.stats_path = Path(f"/tmp/rma-delayline-{self.tag}.json")
        try:
            self._build(hosts, profile, upstreams, seed)
        except BaseException:
            self.close()
            raise

    def _build(self, hosts: dict[str, str], profile: str, upstreams: tuple[str, ...],
               seed: int) -> None:
        for k, name in enumerate(hosts):
            ns = f"rmw{self.tag}-{k}"
            _run("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.hosts[name] = ns
            self.addrs[name] = f"{NET}.{k // 200}.{k % 200 + 10}"
        spec = [[self.hosts[n], self.addrs[n], r] for n, r in hosts.items()]
        ups = [[self.hosts[n], n] for n in upstreams]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.netns.delayline", "--hosts", json.dumps(spec),
             "--upstreams", json.dumps(ups), "--profile", profile, "--seed", str(seed),
             "--stats", str(self.stats_path)],
            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise RuntimeError(f"delay line did not start: {first} "
                               f"{self.proc.stdout.read()[-2000:]}")
        for name, ns in self.hosts.items():
            _run("ip", "-n", ns, "addr", "add", f"{self.addrs[name]}/16", "dev", TUN_NAME)
            _run("ip", "-n", ns, "link", "set", TUN_NAME, "up")

    def stats(self) -> dict[str, Any]:
        """The delay line's counters (packets, dropped, ...) and the pairs' RTTs."""
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def rtt_ms(self, a: str, b: str) -> float:
        """Base round trip between two hosts (no jitter), ms — from the same model."""
        from bench.wan import PROFILES, Wan
        names = list(self.region)
        wan = Wan(PROFILES["global"], len(names), seed=self.seed,
                  regions=[self.region[n] for n in names])
        return wan.base_rtt(names.index(a), names.index(b)) * 1000

    def exec_argv(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name], *cmd]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        self.stats_path.unlink(missing_ok=True)

    def __enter__(self) -> WanLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", required=True, help="JSON [[namespace, ip, region], ...]")
    ap.add_argument("--upstreams", default="[]", help="JSON [[namespace, name], ...]")
    ap.add_argument("--profile", default="global-lossy")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stats", required=True, help="file the counters are written to")
    asyncio.run(_main(ap.parse_args()))
