"""The ``reachable`` probe for ``dht.mode = "auto"``: is this node reachable on UDP from
outside, or behind a NAT / firewall? (See ``DHTComponent._decide_mode`` for when it asks.)

The question goes out from a fresh ephemeral socket, never the DHT socket: a NAT lets
replies to our own outgoing traffic in, which would make every NAT-ed node look
reachable. The seed answers by pinging the port we name from a fresh socket of its own
(``handlers.RpcHandlers.rpc_reachable``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgpack

log = logging.getLogger("rma_agent.dht")

REACHABLE_TIMEOUT = 3.0


class _ProbeProtocol(asyncio.DatagramProtocol):
    """The asking socket: waits for the ``reachable`` answer with our message id."""

    def __init__(self, msg_id: bytes, fut: asyncio.Future[Any]) -> None:
        self.msg_id = msg_id
        self.fut = fut

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.fut.done() or len(data) < 22 or data[0] != 1 or data[1:21] != self.msg_id:
            return
        try:
            self.fut.set_result(msgpack.unpackb(data[21:], raw=False))
        except Exception:
            self.fut.set_result(None)


class _PingResponder(asyncio.DatagramProtocol):
    """A fresh port that answers ``ping`` like a DHT node (for the post-join probe)."""

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 22 or data[0] != 0 or self.transport is None:
            return
        try:
            msg = msgpack.unpackb(data[21:], raw=False)
        except Exception:
            return
        if isinstance(msg, list) and len(msg) == 2 and msg[0] == "ping":
            self.transport.sendto(b"\x01" + data[1:21]
                                  + msgpack.packb(self.node_id, use_bin_type=True), addr)


async def probe_reachable(seed: tuple[str, int], port: int | None, host: str = "0.0.0.0", *,
                          timeout: float = REACHABLE_TIMEOUT,  # noqa: ASYNC109
                          node_id: bytes = bytes(20)) -> bool | None:
    """Ask ``seed`` (RPC ``reachable``) to ping us on ``port``, sending the question from
    a fresh ephemeral socket on ``host``. ``port=None``: ping a second fresh socket that
    answers like a node (a port no NAT has a mapping for). True/False is the seed's
    verdict; None when the seed did not answer at all. Wire format: rpcudp's (kind byte,
    20-byte id, msgpack ``[name, args]``), which ``RMAProtocol`` keeps. A seed that is
    out of probe capacity answers None, returned as None too (no verdict)."""
    loop = asyncio.get_running_loop()
    msg_id = os.urandom(20)
    fut: asyncio.Future[Any] = loop.create_future()
    bind = "::" if ":" in seed[0] else ("0.0.0.0" if ":" in host else host)
    transports: list[asyncio.BaseTransport] = []
    try:
        asker, _ = await loop.create_datagram_endpoint(
            lambda: _ProbeProtocol(msg_id, fut), local_addr=(bind, 0))
        transports.append(asker)
        if port is None:
            target, _ = await loop.create_datagram_endpoint(
                lambda: _PingResponder(node_id), local_addr=(bind, 0))
            transports.append(target)
            port = int(target.get_extra_info("sockname")[1])
        asker.sendto(b"\x00" + msg_id + msgpack.packb(["reachable", [b"", int(port)]],
                                                       use_bin_type=True), seed)
        result = await asyncio.wait_for(fut, timeout)
    except (TimeoutError, OSError) as exc:
        if isinstance(exc, OSError):
            log.debug("dht: reachability probe via %s failed: %s", seed, exc)
        return None
    finally:
        for t in transports:
            t.close()
    # a seed out of probe capacity answers None: no verdict, not "unreachable"
    return result if isinstance(result, bool) else None
