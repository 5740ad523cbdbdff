"""Framing and validation of DHT datagrams: what may come off the wire, and nothing else.

rpcudp's datagram format is kept (``0x00`` request / ``0x01`` reply + 20-byte message id +
msgpack ``[name, args]`` / result), so this network still talks to plain kademlia peers
for ping/find_node. Every datagram is size-checked (> 8 KiB + header is dropped) and
decoded with the C ``msgpack`` library under strict limits; every request is checked
against an explicit table of RPCs with arity and argument types before a handler runs.
Anything else yields a drop *reason* (a short string the protocol counts), never an
exception. This module holds no state: the RPC engine (``rpc``) owns the socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import msgpack
from kademlia.node import Node

MAX_PAYLOAD = 8192                  # rpcudp's limit on the msgpack part
HEADER = 21                         # kind byte + 20-byte message id
MAX_DATAGRAM = MAX_PAYLOAD + HEADER
MAX_NODES_IN_ANSWER = 64            # longest node list we accept from a peer

# name -> (handler, per-argument checks, minimum number of arguments)
RpcTable = dict[str, tuple[Callable[..., Any], tuple[Callable[[Any], bool], ...], int]]


def _norm_host(host: Any) -> Any:
    if isinstance(host, str) and host.startswith("::ffff:"):
        return host[7:]
    return host


def _is_id(v: Any) -> bool:
    return type(v) is bytes and len(v) == 20


def _is_id_prefix(v: Any) -> bool:
    # a boundary in the id space: empty (the end) up to a full 20-byte id
    return type(v) is bytes and len(v) <= 20


def _is_nodeid(v: Any) -> bool:
    # 20 bytes for a server-mode sender, b"" for a client-mode sender
    return type(v) is bytes and (len(v) == 20 or len(v) == 0)


def _is_page(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**32


def _is_port(v: Any) -> bool:
    return type(v) is int and 0 < v < 65536


def parse_nodes(data: Any, limit: int = MAX_NODES_IN_ANSWER) -> list[tuple[bytes, str, int]]:
    """Validated ``(id, ip, port)`` triples out of a peer's node list; junk is skipped."""
    out: list[tuple[bytes, str, int]] = []
    if not isinstance(data, list):
        return out
    for item in data[:limit]:
        if (isinstance(item, list) and len(item) == 3 and _is_id(item[0])
                and type(item[1]) is str and 0 < len(item[1]) <= 64 and _is_port(item[2])):
            out.append((item[0], item[1], item[2]))
    return out



def decode_datagram(datagram: bytes) -> tuple[int, bytes, Any] | str:
    """``(kind, msg_id, body)`` of a datagram, or the reason to drop it."""
    n = len(datagram)
    if n > MAX_DATAGRAM:
        return "oversized"
    if n < HEADER + 1:
        return "short"
    kind = datagram[0]
    if kind > 1:
        return "unknown_kind"
    msg_id = bytes(datagram[1:HEADER])
    try:
        data = msgpack.unpackb(
            datagram[HEADER:], raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_PAYLOAD, max_bin_len=MAX_PAYLOAD, max_array_len=1024,
            max_map_len=16, max_ext_len=0)
    except Exception:
        return "malformed"
    return kind, msg_id, data


def check_request(data: Any, rpcs: RpcTable) -> tuple[str, Callable[..., Any], list[Any]] | str:
    """``(name, handler, args)`` of a decoded request body, or the reason to drop it."""
    if not (isinstance(data, list) and len(data) == 2 and type(data[0]) is str
            and isinstance(data[1], list)):
        return "bad_envelope"
    name, args = data
    entry = rpcs.get(name)
    if entry is None:
        return "unknown_rpc"
    handler, checks, min_args = entry
    if not (min_args <= len(args) <= len(checks)):
        return "bad_arity"
    if not _is_nodeid(args[0]):
        return "bad_nodeid"
    for check, arg in zip(checks, args, strict=False):
        if not check(arg):
            return "bad_args"
    return name, handler, args


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, msg_id: bytes, fut: asyncio.Future[bytes]) -> None:
        self.msg_id = msg_id
        self.fut = fut

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] != b"\x01" or data[1:HEADER] != self.msg_id or self.fut.done():
            return
        try:
            self.fut.set_result(msgpack.unpackb(data[HEADER:], raw=False, max_bin_len=64,
                                                max_str_len=64, max_array_len=8, max_map_len=0))
        except Exception:
            return


async def probe_ping(address: tuple[str, int], my_id: bytes, local_host: str = "0.0.0.0",
                     wait: float = 1.0) -> bool:
    """One ping to ``address`` from a throw-away socket; True if a node id came back."""
    loop = asyncio.get_running_loop()
    msg_id = os.urandom(20)
    fut: asyncio.Future[Any] = loop.create_future()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    bind = local_host if (":" in local_host) == (family == socket.AF_INET6) else (
        "::" if family == socket.AF_INET6 else "0.0.0.0")
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Probe(msg_id, fut), local_addr=(bind, 0), family=family)
    except OSError:
        return False
    try:
        transport.sendto(b"\x00" + msg_id + msgpack.packb(["ping", [my_id]], use_bin_type=True),
                         address)
        res = await asyncio.wait_for(fut, wait)
    except (TimeoutError, OSError):
        return False
    finally:
        transport.close()
    return _is_id(res)


def all_contacts(router: Any) -> list[Node]:
    """Every contact of a routing table (routing.py's ``all_contacts`` or kademlia's buckets)."""
    fn = getattr(router, "all_contacts", None)
    if fn is not None:
        return list(fn())
    return [n for b in router.buckets for n in b.get_nodes()]

