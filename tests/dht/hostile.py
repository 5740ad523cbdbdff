"""Attack tools for the hostile-peer tests: peers that lie, and raw datagrams.

``AttackerHost`` is one machine (one IP) with many UDP ports, each claiming a node id the
attacker chose (e.g. the 20 ids closest to a service key — what grinding keys would give,
without the grinding). Each port speaks the node wire (rpcudp framing: kind byte, 20-byte
message id, msgpack ``[name, args]`` or ``[name, args, token]``) and answers with nothing:
pings with its id (so it passes contact verification as a *legacy* contact: like a 0.2.0
agent it never answers ``identify``, which would expose ids not hashed from keys; see
``test_node_ids`` for that defence and its strict mode), ``find_node`` /
``find_providers`` with no records and, optionally, its sibling ports as the "closest
nodes", ``announce`` with True while storing nothing (a black hole).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from typing import Any

import msgpack

from agent.dht.identity import Identity
from agent.dht.server import DHTNode
from tests.util import wait_for_async


def request(name: str, *args: Any, token: bytes | None = None,
            msg_id: bytes | None = None) -> bytes:
    """One request datagram in the node wire format."""
    env: list[Any] = [name, list(args)] if token is None else [name, list(args), token]
    return b"\x00" + (msg_id or os.urandom(20)) + msgpack.packb(env, use_bin_type=True)


def parse_response(data: bytes) -> tuple[bytes, Any] | None:
    if len(data) < 22 or data[0] != 1:
        return None
    try:
        return bytes(data[1:21]), msgpack.unpackb(data[21:], raw=False)
    except Exception:
        return None


class _LyingPort(asyncio.DatagramProtocol):
    def __init__(self, host: AttackerHost, node_id: bytes) -> None:
        self.host = host
        self.node_id = node_id
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[bytes, asyncio.Future[Any]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is None or len(data) < 22:
            return
        if data[0] == 1:
            got = parse_response(data)
            if got is not None and got[0] in self.pending:
                fut = self.pending.pop(got[0])
                if not fut.done():
                    fut.set_result(got[1])
            return
        try:
            msg = msgpack.unpackb(data[21:], raw=False)
            name = msg[0]
        except Exception:
            return
        self.host.requests[name] = self.host.requests.get(name, 0) + 1
        sib = self.host.sibling_triples() if self.host.advertise_siblings else []
        if name == "ping":
            result: Any = self.node_id
        elif name in ("find_node", "find_value"):
            result = sib
        elif name == "find_providers":
            result = {"records": [], "nodes": sib, "total": 0, "pages": 0}
        elif name == "announce":
            result = True          # "stored" — into a black hole
        else:
            return
        self.transport.sendto(b"\x01" + data[1:21] + msgpack.packb(result, use_bin_type=True),
                              addr)

    async def call(self, addr: tuple[str, int], name: str, *args: Any,
                   timeout: float = 1.0) -> Any:  # noqa: ASYNC109
        msg_id = os.urandom(20)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        assert self.transport is not None
        self.transport.sendto(request(name, *args, msg_id=msg_id), addr)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self.pending.pop(msg_id, None)


class AttackerHost:
    """One IP, one UDP port per chosen id (see module docstring)."""

    def __init__(self, ip: str, ids: list[bytes], *, advertise_siblings: bool = True) -> None:
        self.ip = ip
        self.ids = ids
        self.advertise_siblings = advertise_siblings
        self.ports: list[_LyingPort] = []
        self.addrs: list[tuple[str, int]] = []
        self.requests: dict[str, int] = {}
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> AttackerHost:
        loop = asyncio.get_running_loop()
        for nid in self.ids:
            tr, proto = await loop.create_datagram_endpoint(
                lambda nid=nid: _LyingPort(self, nid), local_addr=(self.ip, 0))
            self._transports.append(tr)
            self.ports.append(proto)
            self.addrs.append(tr.get_extra_info("sockname")[:2])
        return self

    def sibling_triples(self) -> list[list[Any]]:
        return [[nid, ip, port] for nid, (ip, port) in zip(self.ids, self.addrs, strict=True)]

    async def introduce(self, targets: list[tuple[str, int]]) -> None:
        """Join like a node would, from every port: a ping and a ``find_node`` for its
        own id to every target, so they verify and (maybe) add us."""
        async def one(port: _LyingPort, t: tuple[str, int]) -> None:
            await port.call(t, "ping", port.node_id, timeout=0.5)
            await port.call(t, "find_node", port.node_id, port.node_id, timeout=0.5)

        for port in self.ports:
            await asyncio.gather(*(one(port, t) for t in targets))
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for t in self._transports:
            t.close()


def closest_ids(key: bytes, n: int) -> list[bytes]:
    """The ``n`` ids nearest ``key`` (XOR distances 1..n): what a grinder aims for."""
    k = int.from_bytes(key, "big")
    return [(k ^ d).to_bytes(20, "big") for d in range(1, n + 1)]


async def honest_network(n: int, net: int, **kw: Any) -> list[DHTNode]:
    """``n`` DHT nodes on 127.<net>.<i>.1 (one /24 each), joined through the first."""
    nodes: list[DHTNode] = []
    for i in range(n):
        node = DHTNode(Identity.generate(), **kw)
        await node.listen(0, f"127.{net}.{i + 1}.1")
        nodes.append(node)
    seed = [(nodes[0].interface, nodes[0].port)]
    for i in range(1, n, 8):
        await asyncio.gather(*(x.bootstrap(seed) for x in nodes[i:i + 8]))  # type: ignore[arg-type]
    # a second pass lets early joiners learn of later ones
    await asyncio.gather(*(x.bootstrap(seed) for x in nodes[1:]))  # type: ignore[arg-type]
    await settled(nodes)
    return nodes


async def settled(nodes: list[DHTNode], within: float = 30.0) -> None:
    """Wait until no node has a contact check in flight (each check that a request
    started has ended: the contact was added or refused); fail, naming it, if one does not."""
    await wait_for_async(
        lambda: all(n.protocol is None or not n.protocol.liveness.verifying for n in nodes),
        timeout=within, interval=0.05, what="every contact check started ended")


def free_net() -> int:
    """A second loopback octet for one test's nodes (clusters use 64-250): drawn from this
    pytest-xdist worker's half of 20-60, so two workers' hostile tests never share a /16."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    width = 41 // max(count, 1)
    return random.randint(20 + index * width, 20 + (index + 1) * width - 1)


def can_spoof() -> bool:
    """Raw sockets (root or CAP_NET_RAW) are needed to forge a source address."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError:
        return False
    return True


def spoofed_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> int:
    """Send one IPv4 UDP datagram whose source is ``src`` (any address we like); returns
    the UDP payload size. The kernel fills the IP checksum; UDP checksum 0 = none."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(ip + udp + payload, (dst[0], 0))
    return len(payload)


class Sink(asyncio.DatagramProtocol):
    """A victim address: counts what arrives, answers nothing."""

    def __init__(self) -> None:
        self.bytes = 0
        self.datagrams: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.bytes += len(data)
        self.datagrams.append(data)


async def _serve_eclipse(ip: str, service: str, ports: int, targets: list[tuple[str, int]],
                         seconds: float, spoof_as: tuple[str, int] | None) -> None:
    from agent.dht.record import WorkerRecord, service_key

    host = await AttackerHost(ip, closest_ids(service_key(service), ports)).start()
    print("ready", flush=True)
    end = asyncio.get_running_loop().time() + seconds
    spoofed = 0
    try:
        while asyncio.get_running_loop().time() < end:
            await host.introduce(targets)
            if spoof_as is not None and can_spoof():
                fake = WorkerRecord.create(Identity.generate(), name="spoofed",
                                           services=[service], endpoint="https://spoof.example",
                                           gpu="H200", gpu_memory_gb=141, load=0.0,
                                           capacity=8, region="", ttl=3600)
                for t in targets:
                    spoofed_udp(spoof_as, t, request("announce", bytes(20),
                                                     service_key(service), fake.encode()))
                    spoofed += 1
            print(f"introduced {len(targets)} spoofed {spoofed}", flush=True)
            await asyncio.sleep(2.0)
    finally:
        host.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.dht.hostile eclipse --ip A --service ocr --targets h:p,h:p``: run
    the attacker host (for tests that place it in a network namespace)."""
    import argparse

    ap = argparse.ArgumentParser(prog="tests.dht.hostile")
    ap.add_argument("attack", choices=["eclipse"])
    ap.add_argument("--ip", required=True)
    ap.add_argument("--service", default="ocr")
    ap.add_argument("--ports", type=int, default=20)
    ap.add_argument("--targets", required=True, help="comma-separated host:port")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--spoof-as", default="", help="host:port to forge announces from")
    args = ap.parse_args(argv)
    targets = [(h, int(p)) for h, p in (t.rsplit(":", 1) for t in args.targets.split(","))]
    spoof = None
    if args.spoof_as:
        h, p = args.spoof_as.rsplit(":", 1)
        spoof = (h, int(p))
    asyncio.run(_serve_eclipse(args.ip, args.service, args.ports, targets, args.seconds,
                               spoof))


if __name__ == "__main__":
    main()
