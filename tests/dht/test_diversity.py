"""Address diversity: one host (or one /24, /64) cannot fill a bucket or the table."""

from __future__ import annotations

import asyncio
import random

from kademlia.node import Node

from agent.dht.diversity import LOOPBACK_ENV, DiversityPolicy, GroupCounter
from agent.dht.routing import RoutingTable


class FakeProtocol:
    async def call_ping(self, node: Node) -> None:
        pass


def in_loop(fn):
    """Run a table test inside an event loop: a full bucket schedules a ping of its head."""
    def wrapper(*a, **kw):
        async def main():
            fn(*a, **kw)
            await asyncio.sleep(0)
        asyncio.run(main())
    wrapper.__name__ = fn.__name__
    return wrapper


def near(base: bytes, rnd: random.Random) -> bytes:
    """An id sharing the first 4 bytes with ``base`` (all land in one far bucket)."""
    return base[:4] + rnd.randbytes(16)


def test_groups_ipv4_ipv6_and_loopback():
    strict = DiversityPolicy(loopback="strict")
    exempt = DiversityPolicy()
    assert strict.host("203.0.113.3", 5) == "203.0.113.3"
    assert strict.prefix("203.0.113.3", 5) == strict.prefix("::ffff:203.0.113.200", 6) == "203.0.113.0/24"
    assert strict.prefix("2001:db8:1:2::7", 1) == strict.prefix("2001:db8:1:2:ffff::1", 2)
    assert strict.prefix("2001:db8:1:2::7", 1) != strict.prefix("2001:db8:1:3::7", 1)
    # loopback: each ip:port its own host by default, the plain IP when strict
    assert exempt.host("127.0.0.1", 1) != exempt.host("127.0.0.1", 2)
    assert exempt.is_exempt("127.0.0.1") and not strict.is_exempt("127.0.0.1")
    assert strict.host("127.0.0.1", 1) == strict.host("127.0.0.1", 2) == "127.0.0.1"
    assert strict.prefix("127.0.3.1", 1) != strict.prefix("127.0.4.1", 1)


def test_policy_from_env(monkeypatch):
    monkeypatch.setenv(LOOPBACK_ENV, "strict")
    assert DiversityPolicy.from_env().loopback == "strict"
    monkeypatch.setenv(LOOPBACK_ENV, "nonsense")
    assert DiversityPolicy.from_env().loopback == "exempt"


def test_counter_limits():
    c = GroupCounter(DiversityPolicy())
    c.add("198.51.100.1", 1)
    c.add("198.51.100.1", 2)
    assert not c.allows("198.51.100.1", 3, 2, 0)
    assert c.allows("198.51.100.2", 3, 2, 3)
    assert not c.allows("198.51.100.2", 3, 2, 2)
    c.remove("198.51.100.1", 2)
    assert c.allows("198.51.100.1", 3, 2, 0)
    c.remove("198.51.100.1", 1)
    assert not c.hosts and not c.prefixes


@in_loop
def test_one_ip_gets_two_contacts_per_bucket_and_five_in_the_table():
    rnd = random.Random(1)
    table = RoutingTable(FakeProtocol(), 20, Node(b"\x00" * 20), DiversityPolicy())
    # an honest population (distinct /24s) makes the table split into many buckets
    honest = [Node(rnd.randbytes(20), f"198.{i // 200}.{i % 200}.7", 8468) for i in range(400)]
    for n in honest:
        table.add_contact(n)
    table.check_consistency()
    before = len(table)
    assert before > 100 and table.diversity_refused == 0
    # 50 ids on one IP in one far bucket: 2 of them get in
    far = table.buckets[-1]
    lo, hi = far.range
    attacker = [Node(rnd.randrange(lo, hi).to_bytes(20, "big"), "203.0.113.9", 4000 + i)
                for i in range(50)]
    for n in attacker:
        table.add_contact(n)
    table.check_consistency()
    in_far = [n for n in table.all_contacts() if n.ip == "203.0.113.9"]
    assert len(in_far) <= 2
    refused = [n for n in attacker if n not in table]
    assert len(refused) >= 48 and not table.is_new_node(refused[0])  # not worth a ping
    # the same IP spread over every bucket: at most 5 in the whole table
    for i, b in enumerate(table.buckets):
        lo, hi = b.range
        for j in range(3):
            table.add_contact(Node(rnd.randrange(lo, hi + 1).to_bytes(20, "big"),
                                   "203.0.113.9", 5000 + 3 * i + j))
    table.check_consistency()
    assert sum(1 for n in table.all_contacts() if n.ip == "203.0.113.9") == 5
    assert table.diversity_refused > 50


@in_loop
def test_one_slash24_gets_three_per_bucket():
    rnd = random.Random(2)
    table = RoutingTable(FakeProtocol(), 20, Node(b"\x00" * 20), DiversityPolicy())
    for i in range(20):
        table.add_contact(Node(b"\xf0" + rnd.randbytes(19), f"203.0.113.{i + 1}", 8468))
    assert len(table) == 3
    v6 = [Node(b"\xf1" + rnd.randbytes(19), f"2001:db8:0:1::{i + 1:x}", 8468) for i in range(9)]
    for n in v6:
        table.add_contact(n)
    assert sum(1 for n in table.all_contacts() if n.ip.startswith("2001:db8:0:1:")) == 3
    table.check_consistency()


@in_loop
def test_loopback_exempt_by_default_strict_on_request():
    rnd = random.Random(3)
    nodes = [Node(b"\xf0" + rnd.randbytes(19), "127.0.0.1", 9000 + i) for i in range(30)]
    table = RoutingTable(FakeProtocol(), 20, Node(b"\x00" * 20))
    for n in nodes:
        table.add_contact(n)
    assert len(table) == 30 and table.diversity_refused == 0
    strict = RoutingTable(FakeProtocol(), 20, Node(b"\x00" * 20),
                          DiversityPolicy(loopback="strict"))
    for n in nodes:
        strict.add_contact(n)
    assert len(strict) == 2


@in_loop
def test_promoted_replacement_is_checked_again():
    pol = DiversityPolicy(bucket_per_ip=0, bucket_per_prefix=0, table_per_ip=1,
                          table_per_prefix=0)
    table = RoutingTable(FakeProtocol(), 2, Node(b"\x00" * 20), pol)
    # ids sharing exactly 5 leading bits: their bucket (depth 5) does not split when full
    h1 = Node(b"\xf8" + bytes(19), "198.51.100.1", 1)
    h2 = Node(b"\xfc" + bytes(19), "198.51.101.1", 1)
    a2 = Node(b"\xfa" + bytes(19), "203.0.113.9", 2)
    for n in (h1, h2, a2):
        table.add_contact(n)
    far = table.buckets[table.get_bucket_for(a2)]
    assert a2.id in far.replacement_nodes        # bucket full: cached (IP X holds 0)
    table.add_contact(Node(b"\x01" + bytes(19), "203.0.113.9", 3))   # now X holds 1
    table.remove_contact(h1)                      # a2 would be promoted: X would hold 2
    table.check_consistency()
    assert a2 not in table and h2 in table
    assert table.diversity_refused == 1


def test_private_addresses_keep_per_ip_limits_but_form_no_slash24():
    pol = DiversityPolicy()
    assert pol.prefix("10.77.0.5", 1) != pol.prefix("10.77.0.6", 1)
    assert pol.prefix("192.168.1.5", 1) == "192.168.1.5"
    assert pol.prefix("fd00::5", 1) == "fd00::5"
    assert pol.host("10.77.0.5", 1) == pol.host("10.77.0.5", 2)    # still one host
    c = GroupCounter(pol)
    for i in range(20):                # a LAN: 20 boxes in one /24, all admitted
        assert c.allows(f"192.168.1.{i + 1}", 8468, 2, 3)
        c.add(f"192.168.1.{i + 1}", 8468)
    c.add("192.168.1.1", 8469)
    assert not c.allows("192.168.1.1", 8470, 2, 3)                   # one box, many ports
