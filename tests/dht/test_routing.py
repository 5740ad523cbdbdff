"""RoutingTable: the id buffer follows the buckets, and find_neighbors is exact."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable as KadRoutingTable

import _fast
from agent.dht.diversity import DiversityPolicy
from agent.dht.routing import RoutingTable, brute_force_neighbors

IMPLS = [pytest.param(_fast.pure, id="python"),
         pytest.param(_fast.compiled, id="cython",
                      marks=pytest.mark.skipif(_fast.compiled is None,
                                               reason="Cython kernels not built"))]


@pytest.fixture(params=IMPLS)
def kernel(request, monkeypatch):
    """Run the routing table on each k_closest implementation."""
    monkeypatch.setattr(_fast, "k_closest", request.param.k_closest)
    monkeypatch.setattr(_fast, "k_closest_items", request.param.k_closest_items)
    return request.param


class FakeProtocol:
    """Records the pings kademlia's bucket-full path sends."""

    def __init__(self) -> None:
        self.pinged: list[Node] = []

    async def call_ping(self, node: Node) -> None:
        self.pinged.append(node)


def live_nodes(table) -> dict[bytes, Node]:
    return {nid: n for b in table.buckets for nid, n in b.nodes.items()}


def cached_ids(table) -> set[bytes]:
    return {nid for b in table.buckets for nid in b.replacement_nodes}


def ids_of(nodes) -> list[bytes]:
    return [n.id for n in nodes]


# Clustered ids (shared prefixes) force deep splits and full, unsplittable buckets.
prefixes = st.sampled_from([b"", b"\x00", b"\xff", b"\x80\x00", b"\x7f\xff\xff", b"\x12\x34"])
ids = st.tuples(prefixes, st.binary(min_size=20, max_size=20)).map(lambda t: (t[0] + t[1])[:20])
edge_ids = st.sampled_from([bytes(20), b"\xff" * 20, b"\x80" + bytes(19), b"\x40" + bytes(19),
                            b"\xc0" + bytes(19), b"\x7f" + b"\xff" * 19])
any_id = st.one_of(ids, edge_ids)


@st.composite
def scenarios(draw):
    pool = draw(st.lists(any_id, min_size=1, max_size=60, unique=True))
    own = draw(st.one_of(st.sampled_from(pool), any_id))
    ksize = draw(st.sampled_from([1, 2, 3, 4, 8, 20]))
    pick = st.integers(0, len(pool) - 1)
    port = st.integers(1, 6)  # few ports: several contacts share an ip:port (exclude)
    op = st.one_of(
        st.tuples(st.just("add"), pick, port),
        st.tuples(st.just("add"), pick, port),
        st.tuples(st.just("remove"), pick, port),
        st.tuples(st.just("find"), st.one_of(pick, any_id), st.one_of(st.none(), port),
                  st.sampled_from([None, 0, 1, 3, 20, 100])),
    )
    return pool, own, ksize, draw(st.lists(op, max_size=120))


def check_find(table, target: bytes, k, exclude) -> None:
    want = brute_force_neighbors(live_nodes(table).values(), target, k or table.ksize, exclude)
    assert ids_of(table.find_neighbors(Node(target), k=k, exclude=exclude)) == ids_of(want)


async def run_scenario(pool, own, ksize, ops) -> None:
    table = RoutingTable(FakeProtocol(), ksize, Node(own))
    for op in ops:
        if op[0] == "add":
            table.add_contact(Node(pool[op[1]], "127.0.0.1", op[2]))
        elif op[0] == "remove":
            table.remove_contact(Node(pool[op[1]], "127.0.0.1", op[2]))
        else:
            _, t, port, k = op
            target = pool[t] if isinstance(t, int) else t
            exclude = None if port is None else Node(bytes(20), "127.0.0.1", port)
            check_find(table, target, k, exclude)
        table.check_consistency()
        live, cached = live_nodes(table), cached_ids(table)
        assert len(table) == len(live)
        assert set(ids_of(table.all_contacts())) == set(live)
        for nid in pool:
            assert table.is_new_node(Node(nid)) == (nid not in live and nid not in cached)
    # Every pool id as a target, at the end.
    for nid in pool:
        check_find(table, nid, None, None)
    await asyncio.sleep(0)  # let the pings scheduled by full buckets run


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sc=scenarios())
def test_random_add_remove_find(kernel, sc):
    asyncio.run(run_scenario(*sc))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_same_buckets_as_kademlia_and_exact_where_it_is_not(kernel, seed):
    """Fed the same contacts, the bucket structure is kademlia's; only the answers improve."""
    rnd = random.Random(seed)
    me = Node(rnd.randbytes(20))
    ours, kad = RoutingTable(FakeProtocol(), 20, me), KadRoutingTable(FakeProtocol(), 20, me)
    for i in range(3000):
        n = Node(rnd.randbytes(20), "127.0.0.1", 2000 + i)
        ours.add_contact(n)
        kad.add_contact(n)
        if rnd.random() < 0.1:
            victim = rnd.choice(ours.all_contacts())
            ours.remove_contact(victim)
            kad.remove_contact(victim)
    ours.check_consistency()
    assert [b.range for b in ours.buckets] == [b.range for b in kad.buckets]
    assert [list(b.nodes) for b in ours.buckets] == [list(b.nodes) for b in kad.buckets]
    kad_wrong = 0
    for _ in range(300):
        t = Node(rnd.randbytes(20))
        exact = brute_force_neighbors(ours.all_contacts(), t.id, 20)
        assert ids_of(ours.find_neighbors(t)) == ids_of(exact)
        kad_wrong += ids_of(kad.find_neighbors(t)) != ids_of(exact)
    # Not asserted > 0 (it depends on the table); reported for the record.
    print(f"kademlia's find_neighbors wrong for {kad_wrong}/300 targets")
    await asyncio.sleep(0)


def fill_unsplittable_bucket(ksize: int = 2):
    """A table whose upper half is a full bucket that may not split (depth 5, not ours)."""
    proto = FakeProtocol()
    table = RoutingTable(proto, ksize, Node(bytes(20)))
    # Both start with bits 10000 and differ in the sixth: depth 5, and 5 % 5 == 0.
    a = Node(b"\x84" + bytes(19), "127.0.0.1", 1)
    b = Node(b"\x80" + bytes(18) + b"\x01", "127.0.0.1", 2)
    low = Node(b"\x01" + bytes(19), "127.0.0.1", 3)
    table.add_contact(a)
    table.add_contact(b)
    table.add_contact(low)  # splits the root bucket: [0, 2^159] and (2^159, 2^160]
    return proto, table, a, b


async def test_full_bucket_caches_contact_and_pings_head(kernel):
    proto, table, a, _b = fill_unsplittable_bucket()
    assert len(table.buckets) == 2
    new = Node(b"\xf0" + bytes(19), "127.0.0.1", 4)
    assert table.is_new_node(new)
    table.add_contact(new)
    table.add_contact(Node(b"\xf1" + bytes(19), "127.0.0.1", 5))  # same head: one ping
    await asyncio.sleep(0)
    assert ids_of(proto.pinged) == [a.id]  # the least-recently-seen contact
    table.check_consistency()
    assert new.id not in ids_of(table.all_contacts())  # cached, not routable
    assert not table.is_new_node(new)  # ...but known: no welcome storm
    assert new not in table
    # Ping done: the next contact for that bucket pings again.
    await asyncio.sleep(0)
    table.add_contact(Node(b"\xf2" + bytes(19), "127.0.0.1", 6))
    await asyncio.sleep(0)
    assert ids_of(proto.pinged) == [a.id, a.id]


async def test_kademlia_forgets_cached_contacts():
    """The bug being fixed: plain kademlia calls a cached contact new, every time."""
    kad = KadRoutingTable(FakeProtocol(), 2, Node(bytes(20)))
    for nid in (b"\x84" + bytes(19), b"\x80" + bytes(18) + b"\x01", b"\x01" + bytes(19)):
        kad.add_contact(Node(nid, "127.0.0.1", 1))
    new = Node(b"\xf0" + bytes(19), "127.0.0.1", 4)
    kad.add_contact(new)
    assert new.id in kad.buckets[kad.get_bucket_for(new)].replacement_nodes
    assert kad.is_new_node(new)
    await asyncio.sleep(0)


async def test_remove_promotes_replacement_into_buffer(kernel):
    _, table, a, b = fill_unsplittable_bucket()
    cached = Node(b"\xf0" + bytes(19), "127.0.0.1", 4)
    table.add_contact(cached)
    table.remove_contact(a)  # the ping failed
    table.check_consistency()
    assert set(ids_of(table.all_contacts())) == {b.id, cached.id, b"\x01" + bytes(19)}
    assert ids_of(table.find_neighbors(Node(b"\xf0" + bytes(18) + b"\x01"), k=1)) == [cached.id]
    # Removing a contact that is only cached leaves the buffer alone.
    other = Node(b"\xf3" + bytes(19), "127.0.0.1", 7)
    table.add_contact(other)
    table.remove_contact(other)
    table.check_consistency()
    assert len(table) == 3
    await asyncio.sleep(0)


def test_split_point_id_found_in_its_bucket(kernel):
    """kademlia looks an id equal to a split point up in the wrong bucket; we do not."""
    table = RoutingTable(FakeProtocol(), 1, Node(bytes(20)))
    mid = Node(b"\x80" + bytes(19), "127.0.0.1", 1)
    table.add_contact(Node(b"\x01" + bytes(19), "127.0.0.1", 2))
    table.add_contact(mid)  # splits at 2^159: mid belongs to the lower half
    table.check_consistency()
    assert mid.id in table.buckets[table.get_bucket_for(mid)].nodes
    assert not table.is_new_node(mid)
    table.remove_contact(mid)
    table.check_consistency()
    assert mid.id not in live_nodes(table)


def test_exclude_and_self_and_refresh(kernel):
    rnd = random.Random(4)
    # 60 contacts on one made-up address: diversity limits are not what is tested here
    table = RoutingTable(FakeProtocol(), 20, Node(rnd.randbytes(20)), DiversityPolicy.unlimited())
    nodes = [Node(rnd.randbytes(20), "10.0.0.1", 1000 + i % 5) for i in range(60)]
    for n in nodes:
        table.add_contact(n)
    target = nodes[7]
    got = table.find_neighbors(target, exclude=Node(b"x" * 20, "10.0.0.1", 1001))
    assert target.id not in ids_of(got)
    assert all(n.port != 1001 for n in got)
    assert ids_of(got) == ids_of(brute_force_neighbors(
        nodes, target.id, 20, Node(b"x" * 20, "10.0.0.1", 1001)))
    # A contact that moves (same id, new port) is refreshed in place.
    moved = Node(nodes[3].id, "10.0.0.2", 9)
    table.add_contact(moved)
    table.check_consistency()
    assert any(n is moved for n in table.all_contacts())
    assert ids_of(table.find_neighbors(Node(nodes[3].id), exclude=moved)) == ids_of(
        brute_force_neighbors(table.all_contacts(), nodes[3].id, 20, moved))
    table.flush()
    table.check_consistency()
    assert len(table) == 0 and table  # empty but truthy
    assert table.find_neighbors(target) == []


def test_bad_ids(kernel):
    table = RoutingTable(FakeProtocol(), 20, Node(bytes(20)))
    table.add_contact(Node(b"short", "127.0.0.1", 1))  # dropped, never routed
    table.add_contact(Node(b"\x01" * 20, "127.0.0.1", 2))
    table.check_consistency()
    assert len(table) == 1
    assert not table.is_new_node(Node(b"short"))
    table.remove_contact(Node(b"short"))
    with pytest.raises(ValueError):
        table.find_neighbors(Node(b"short"))
    not_bytes = Node(b"x" * 20)
    not_bytes.id = "x" * 20
    with pytest.raises(TypeError):
        table.find_neighbors(not_bytes)
    assert len(table) == 1


# ------------------------------------------------------------- inside real kademlia servers
class BufferedProtocol(KademliaProtocol):
    def __init__(self, source_node, storage, ksize):
        super().__init__(source_node, storage, ksize)
        self.router = RoutingTable(self, ksize, source_node)


class BufferedServer(Server):
    protocol_class = BufferedProtocol


async def test_real_udp_servers_use_the_table():
    """Eight kademlia servers on 127.0.0.1 with our table: join, set, get, exact tables."""
    servers = [BufferedServer(ksize=4) for _ in range(8)]
    try:
        for s in servers:
            await s.listen(0, interface="127.0.0.1")
        ports = [s.transport.get_extra_info("sockname")[1] for s in servers]
        for s in servers[1:]:
            found = await asyncio.wait_for(s.bootstrap([("127.0.0.1", ports[0])]), 10)
            assert found
        assert await asyncio.wait_for(servers[3].set("model/ocr", "w1"), 10)
        assert await asyncio.wait_for(servers[6].get("model/ocr"), 10) == "w1"
        for s in servers:
            router = s.protocol.router
            assert isinstance(router, RoutingTable)
            router.check_consistency()
            assert len(router) >= 1
            t = Node(random.Random(len(router)).randbytes(20))
            assert ids_of(router.find_neighbors(t)) == ids_of(
                brute_force_neighbors(router.all_contacts(), t.id, 4))
    finally:
        for s in servers:
            s.stop()
