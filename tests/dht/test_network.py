"""In-process networks of real DHTNodes on 127.0.0.1 (real UDP sockets, uvloop).

Shows: many workers' records for one service coexist and are found from every node; a
client-mode node is found yet sits in no routing table; after stopping 30 % of the nodes
the live records are still all found (latency: bench/); replays, forgeries, bad
signatures are never returned; withdraw and expiry take effect; a newcomer that becomes
one of the k closest gets the key's records handed over (targeted, not a re-store).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from kademlia.node import Node

from agent.dht.identity import Identity
from agent.dht.record import ALL_SERVICES, WorkerRecord, service_key
from agent.dht.server import DHTNode
from tests.util import run_uvloop, wait_for_async


def rec_for(ident: Identity, *, seq=None, ttl=300.0, services=("ocr",), load=0.1,
            name="w", now=None) -> WorkerRecord:
    return WorkerRecord.create(ident, name=name, services=services,
                               endpoint=f"https://{ident.node_id.hex()[:8]}.example",
                               gpu="T4", gpu_memory_gb=16, load=load, capacity=4, region="",
                               seq=seq, ttl=ttl, now=now)


async def build(n: int, idents: list[Identity] | None = None, **kw) -> list[DHTNode]:
    nodes = []
    for i in range(n):
        node = DHTNode(idents[i] if idents else Identity.generate(), **kw)
        await node.listen(0, "127.0.0.1")
        nodes.append(node)
    seed = [("127.0.0.1", nodes[0].port)]
    for i in range(1, n, 8):  # joins in small waves, like a real network growing
        await asyncio.gather(*(x.bootstrap(seed) for x in nodes[i:i + 8]))
    await settled(nodes)
    return nodes


async def settled(nodes: list[DHTNode]) -> None:
    """Wait until no node has a contact check in flight (each ends with an answer or its
    request's timeout, so they do end; the limit is generous)."""
    await wait_for_async(lambda: all(not n.protocol.liveness.verifying for n in nodes),
                         timeout=20, interval=0.05,
                         what="no node with a contact check in flight")


def stop_all(nodes: list[DHTNode]) -> None:
    for n in nodes:
        n.stop()




def test_many_workers_client_mode_and_churn():
    async def scenario():
        nodes = await build(40)
        client = DHTNode(Identity.generate(), mode="client")
        await client.listen(0, "127.0.0.1")
        try:
            assert await client.bootstrap([("127.0.0.1", nodes[3].port)]) > 0
            # 30 server nodes + the client each announce their own worker record
            records = {}
            for n in [*nodes[:30], client]:
                r = rec_for(n.identity, services=("ocr", "llm"))
                assert await n.announce(r) > 0
                records[r.worker_id] = r
            want = set(records)
            for n in [*nodes, client]:
                got = await n.find_providers("ocr")
                assert {r.worker_id for r in got} == want  # all coexist, found everywhere
                assert all(r == records[r.worker_id] for r in got)
            everything = await nodes[17].find_providers(ALL_SERVICES)
            assert {r.worker_id for r in everything} == want
            assert len(await nodes[5].find_providers("ocr", limit=7)) == 7
            assert await nodes[5].find_providers("nobody-serves-this") == []

            # the client is in no routing table, and has stored nothing for others
            cid = client.identity.node_id.hex()
            for n in nodes:
                assert all(c[0] != cid and c[2] != client.port for c in n.contacts())
            assert client.storage.count() == 0 and client.peers() > 0

            # stop 30 % of the nodes (12 of 40): the 6 closest to the service key (the
            # holders a lookup asks first) and 6 others
            kl = int.from_bytes(service_key("ocr"), "big")
            by_dist = sorted(nodes[4:], key=lambda n: int.from_bytes(n.node.id, "big") ^ kl)
            dead = by_dist[:6] + by_dist[-6:]
            live = [n for n in nodes if n not in dead]
            stop_all(dead)
            live_ids = {r.worker_id for r in records.values()
                        if r.worker_id not in {d.identity.node_id for d in dead}}
            # (how fast: bench/dht.py and bench/scale.py measure lookup latency)
            for _round in range(2):
                for n in [*live, client]:
                    got = await n.find_providers("ocr")
                    assert live_ids <= {r.worker_id for r in got}
            # dead contacts leave routing tables once their (adaptive) timeouts expire;
            # lookups did not wait for those, they hedged past the dead peers
            # (three lost requests spread over dead_span, 5 s: see liveness)
            await wait_for_async(
                lambda: sum(n.stats()["removed_contacts"] for n in live) > 0, timeout=30,
                what="a dead contact removed")
            # the client's lookups asked the dead holders closest to the key first: those
            # requests timed out (counted, never logged at ERROR), and the RTT it
            # measured from the live ones is reported
            await wait_for_async(lambda: client.stats()["timeouts"] > 0, timeout=10,
                                 what="a timed-out request counted by the client")
            st = client.stats()
            assert st["mode"] == "client" and st["timeouts"] > 0
            assert st["rtt_ms"] is not None and st["rtt_ms"] > 0
        finally:
            stop_all(nodes)
            client.stop()
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_replay_forgery_withdraw_expiry_over_the_wire():
    async def scenario():
        nodes = await build(12)
        try:
            a, b = Identity.generate(), Identity.generate()
            v1 = rec_for(a, seq=1, name="v1")
            v2 = rec_for(a, seq=2, name="v2")
            assert await nodes[1].announce(v1) > 0
            assert await nodes[2].announce(v2) > 0
            # replay of the older record: every storing node refuses it
            assert await nodes[3].announce(v1) == 0
            for n in nodes:
                assert [r.name for r in await n.find_providers("ocr")] == ["v2"]

            # a second identity cannot overwrite a's record
            forged = dataclasses.replace(rec_for(b, seq=99, name="evil"), worker_id=a.node_id)
            forged2 = dataclasses.replace(rec_for(b, seq=99, name="evil"), worker_id=a.node_id,
                                          public_key=a.public_key)
            bad_sig = dataclasses.replace(rec_for(a, seq=50, name="tampered"),
                                          endpoint="https://evil.example")
            proto = nodes[4].protocol
            key = service_key("ocr")
            targets = proto.router.find_neighbors(Node(key), k=20)
            for evil in (forged, forged2, bad_sig):
                res = await asyncio.gather(*(proto.call_announce(t, key, evil.encode())
                                             for t in targets))
                assert all(ok and r is False for ok, r in res)
            assert sum(n.stats()["drops"].get("bad_record", 0) for n in nodes) >= 3
            got = await nodes[6].find_providers("ocr")
            assert [(r.worker_id, r.name) for r in got] == [(a.node_id, "v2")]

            # b's own record coexists with a's
            assert await nodes[5].announce(rec_for(b, name="b")) > 0
            assert {r.name for r in await nodes[7].find_providers("ocr")} == {"v2", "b"}

            # withdraw: gone from every lookup at once
            assert await nodes[2].withdraw(v2.tombstone(a)) > 0
            for n in nodes:
                assert [r.name for r in await n.find_providers("ocr")] == ["b"]

            # expiry: a short-lived record disappears by itself
            c = Identity.generate()
            assert await nodes[8].announce(rec_for(c, ttl=1.0, name="short")) > 0
            assert "short" in {r.name for r in await nodes[9].find_providers("ocr")}
            async def expired() -> bool:
                return "short" not in {r.name for r in await nodes[9].find_providers("ocr")}

            await wait_for_async(expired, timeout=10, interval=0.1,   # its 1 s lifetime
                                 what="the 1 s record gone from lookups")
            assert "short" not in {r.name for r in await nodes[9].find_providers("ocr")}
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def closer_than_all(key: bytes, nodes: list[DHTNode]) -> Identity:
    """An identity closer to ``key`` than every node: one random id in len(nodes) + 1
    beats them all, so 2,000 draws all failing has a chance below 1e-35 (the test never
    skips its assertions)."""
    kl = int.from_bytes(key, "big")
    best_existing = min(int.from_bytes(n.node.id, "big") ^ kl for n in nodes)
    return next(i for i in (Identity.generate() for _ in range(2000))
                if int.from_bytes(i.node_id, "big") ^ kl < best_existing)


async def held_by_newcomer(newcomer: DHTNode, key: bytes, want: int) -> int:
    """Wait (on the store, up to 30 s) until the newcomer holds ``want`` records of
    ``key``; returns what it holds."""
    await wait_for_async(lambda: newcomer.storage.count(key) >= want, timeout=30,
                         interval=0.05, what=f"the newcomer holding {want} records of the key")
    return newcomer.storage.count(key)


def test_newcomer_gets_targeted_handoff():
    async def scenario():
        nodes = await build(24)
        try:
            key = service_key("asr")
            workers = [Identity.generate() for _ in range(5)]
            for w in workers:
                assert await nodes[1].announce(rec_for(w, services=("asr",))) > 0
            newcomer = DHTNode(closer_than_all(key, nodes))
            await newcomer.listen(0, "127.0.0.1")
            nodes.append(newcomer)
            await newcomer.bootstrap([("127.0.0.1", nodes[0].port)])
            assert await held_by_newcomer(newcomer, key, 5) == 5
            await settled(nodes)   # the other holders' contact checks of the newcomer end
            h1 = sum(n.protocol.liveness.handoffs for n in nodes)
            # targeted: at most the 5 workers' records under their 2 keys each (asr and
            # their index shard), from at most two holders whose views differ — not a
            # re-store to every node (it was up to 250 before), and the newcomer, verified
            # by old members' pings, hands nothing back to them
            held = newcomer.storage.count()
            assert 5 <= h1 <= 20, (h1, held)
            assert newcomer.protocol.liveness.handoffs == 0
            # no storm: hearing again from contacts a node already knows (every request
            # and reply "welcomes" its sender) hands nothing over
            for n in nodes:
                for c in n.protocol.router.all_contacts():
                    for _ in range(3):
                        n.protocol.welcome_if_new(c)   # (a handoff is counted at once)
            assert sum(n.protocol.liveness.handoffs for n in nodes) == h1
            # and a contact that drops out and comes back within a minute is not re-fed
            p = nodes[0].protocol
            c = p.router.all_contacts()[0]
            p.liveness._welcomed[c.id] = time.monotonic()
            p.router.remove_contact(c)
            p.welcome_if_new(c)
            assert sum(n.protocol.liveness.handoffs for n in nodes) == h1
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())



def test_newcomer_gets_handoff_from_the_seed_it_joins_through():
    """The seed a newcomer pings first is the closest holder of the key: the newcomer's
    ping added it to the seed's table without a handoff (pings come from old members
    too), and its join lookup then came from a known contact — so nobody handed the
    key over (the cause of the flaky handoff test: 1 run in ~24 drew such a seed). The
    seed now hands over at the newcomer's first request."""
    async def scenario():
        key = service_key("asr")
        kl = int.from_bytes(key, "big")
        idents = sorted((Identity.generate() for _ in range(24)),
                        key=lambda i: int.from_bytes(i.node_id, "big") ^ kl)
        nodes = await build(24, idents)          # nodes[0], the seed, is the closest
        try:
            for w in (Identity.generate() for _ in range(5)):
                assert await nodes[1].announce(rec_for(w, services=("asr",))) > 0
            await wait_for_async(lambda: nodes[0].storage.count(key) == 5,
                                 what="the seed holding the 5 announced records")
            newcomer = DHTNode(closer_than_all(key, nodes))
            await newcomer.listen(0, "127.0.0.1")
            nodes.append(newcomer)
            await newcomer.bootstrap([("127.0.0.1", nodes[0].port)])
            assert await held_by_newcomer(newcomer, key, 5) == 5
            assert nodes[0].protocol.liveness.handoffs >= 5
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_large_service_fully_found_through_pages():
    """100 workers on one service: more than one answer holds (20), so every lookup
    assembles them from different pages of several nodes plus follow-up page requests."""
    async def scenario():
        nodes = await build(16)
        try:
            workers = [Identity.generate() for _ in range(100)]
            await asyncio.gather(*(nodes[i % 16].announce(rec_for(w, load=i / 10))
                                   for i, w in enumerate(workers)))
            want = {w.node_id for w in workers}
            for n in nodes:
                got = await n.find_providers("ocr")
                assert {r.worker_id for r in got} == want
            best = await nodes[3].find_providers("ocr", limit=5)
            assert [r.load for r in best] == sorted(r.load for r in best)
            assert best[0].load == 0.0  # the least loaded first
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


async def complete(nodes: list[DHTNode], service: str, recs: list[WorkerRecord]) -> None:
    """Announce ``recs`` until every node of ``nodes`` stores each (what the workers'
    republish does): stores lost on a loaded machine would leave storing sets that
    diverge, which lookups then pay to reconcile."""
    key = service_key(service)
    todo = recs
    for _ in range(5):
        await asyncio.gather(*(nodes[i % len(nodes)].announce(r) for i, r in enumerate(todo)))
        todo = [r for r in todo if any(n.storage.record(key, r.worker_id) is None
                                       for n in nodes)]
        if not todo:
            return
    raise AssertionError(f"{len(todo)} {service} records still missing from some node")


def test_diverged_storing_sets_still_add_up_to_every_worker_at_linear_cost():
    """Storing nodes that each missed different announces (churn, timeouts, a healed
    split): a lookup compares their sketches and re-reads what differs, so it returns
    every worker; its datagrams grow with the records returned; a withdrawal in a large
    service reaches every lookup at once (tombstones are part of range reads)."""
    async def scenario():
        nodes = await build(16)
        for n in nodes:  # 16 nodes announce 700 workers' records, as coordinators would:
            n.trust("127.0.0.1")  # past the per-sender bound
        try:
            workers = [Identity.generate() for _ in range(300)]
            recs = {}
            for i, w in enumerate(workers):
                recs[w.node_id] = rec_for(w, load=i / 100)
            await asyncio.gather(*(nodes[i % 16].announce(r)
                                   for i, r in enumerate(recs.values())))
            key = service_key("ocr")
            # each storing node forgets a different tenth of the records
            for j, n in enumerate(nodes):
                bucket = n.storage._data.get(key, {})
                for wid in [w for w in sorted(bucket) if w[0] % 10 == j % 10]:
                    n.storage._remove(key, bucket, wid)
            want = set(recs)
            for n in nodes[:6]:
                got = await n.find_providers("ocr")
                assert {r.worker_id for r in got} == want

            # cost grows with the records returned: 100 vs 300 workers, asked by a client
            # (it holds no copy of its own), counting every node's datagrams
            client = DHTNode(Identity.generate(), mode="client")
            await client.listen(0, "127.0.0.1")
            nodes.append(client)
            await client.bootstrap([("127.0.0.1", nodes[0].port)])
            for svc, n_workers in (("asr", 100), ("big", 300)):
                await complete(nodes[:16], svc, [rec_for(Identity.generate(), services=(svc,))
                                                 for _ in range(n_workers)])

            def timeouts() -> int:
                return sum(sum(x.protocol.engine.timeouts.values()) for x in nodes)

            async def datagrams(service: str, expect: int) -> float:
                # a request that timed out makes the crawl ask another node: that is the
                # loaded machine's cost, not the lookup's, so a round with a timeout is
                # measured again (bounded)
                for _ in range(5):
                    sent = [sum(x.protocol.engine.tx.values()) for x in nodes]
                    lost = timeouts()
                    for _ in range(4):
                        client.hints.forget_all()     # a crawl each time: like with like
                        assert len(await client.find_providers(service)) == expect
                    if timeouts() == lost:
                        break
                return sum(sum(x.protocol.engine.tx.values()) - s0
                           for x, s0 in zip(nodes, sent, strict=True)) / 4
            d100, d300 = await datagrams("asr", 100), await datagrams("big", 300)
            # linear: 3x the workers, at most about 3x the datagrams (quadratic would be
            # 9x); measured 13 vs 25 idle. Both services' storing sets are whole and each
            # lookup is a crawl, so the ratio compares like with like (stores lost under
            # load, or a warm lookup for one and a crawl for the other, read as 5x)
            assert d100 < d300 < 4 * d100, (d100, d300)

            # a withdrawal in the 300-worker service: gone from every lookup at once
            gone = workers[123]
            assert await nodes[2].withdraw(recs[gone.node_id].tombstone(gone)) > 0
            for n in nodes:
                assert gone.node_id not in {r.worker_id for r in await n.find_providers("ocr")}
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())


def test_service_counts_from_the_sharded_index():
    async def scenario():
        nodes = await build(20)
        try:
            for i in range(60):
                ident = Identity.generate()
                svc = ("ocr",) if i < 40 else ("asr", "llm")
                assert await nodes[i % 20].announce(rec_for(ident, services=svc)) > 0
            for n in (nodes[0], nodes[11]):
                assert await n.service_counts() == {"ocr": 40, "asr": 20, "llm": 20}
            everyone = await nodes[5].find_providers(ALL_SERVICES)
            assert len(everyone) == 60
            # no single key took every announce: the 60 records are spread over shards
            shard_keys = {k for n in nodes for k in n.storage.keys()} - {
                service_key("ocr"), service_key("asr"), service_key("llm")}
            assert len(shard_keys) >= 20 and service_key(ALL_SERVICES) not in shard_keys
        finally:
            stop_all(nodes)
            await asyncio.sleep(0.01)

    run_uvloop(scenario())
