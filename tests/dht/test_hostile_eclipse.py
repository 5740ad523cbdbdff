"""Eclipse attempt: one host, 20 ports, the 20 ids closest to ``ocr``, answering nothing.

Real DHT nodes over real UDP on loopback, each honest node on its own /24
(127.<net>.<i>.1) and the attacker on one address (127.<net>.250.1) with 20 ports, under
``RMA_AGENT_DHT_LOOPBACK=strict`` so loopback addresses count as hosts. Honest workers
announce ``ocr``; every honest node then looks it up repeatedly. With the diversity
limits (routing table and lookup window) ≥ 99 % of lookups find every honest worker.
The same attack with the limits off (loopback exempt: every ip:port its own host) is
measured as the control, to show the attack is real.
"""

from __future__ import annotations

import time

import pytest

from agent.dht.diversity import LOOPBACK_ENV
from agent.dht.record import WorkerRecord, service_key
from tests.dht.hostile import AttackerHost, closest_ids, free_net, honest_network, settled
from tests.util import run_uvloop

N_HONEST = 30
N_WORKERS = 5
ROUNDS = 7


def _record(node) -> WorkerRecord:
    return WorkerRecord.create(node.identity, name="honest", services=["ocr"],
                               endpoint=f"https://{node.identity.node_id.hex()[:8]}.example",
                               gpu="T4", gpu_memory_gb=16, load=0.5, capacity=4, region="",
                               ttl=300)


async def _attack() -> dict[str, float]:
    net = free_net()
    nodes = await honest_network(N_HONEST, net)
    attacker = await AttackerHost(f"127.{net}.250.1", closest_ids(service_key("ocr"), 20)).start()
    try:
        # introduce() waits for every answer: each node has started its contact checks
        await attacker.introduce([(n.interface, n.port) for n in nodes])
        await settled(nodes)         # ... and now they are done: contacts added or refused
        in_tables = [sum(1 for c in n.contacts() if c[1] == attacker.ip) for n in nodes]
        workers = nodes[1:1 + N_WORKERS]
        for w in workers:
            await w.announce(_record(w))
        want = {w.identity.node_id for w in workers}
        found = total = 0
        t0 = time.monotonic()
        for _ in range(ROUNDS):
            for n in nodes:
                got = {r.worker_id for r in await n.find_providers("ocr")}
                total += 1
                found += want <= got
        return {"found_share": found / total, "lookups": total,
                "attacker_contacts_max": max(in_tables),
                "attacker_contacts_mean": sum(in_tables) / len(in_tables),
                "seconds": time.monotonic() - t0,
                "attacker_requests": sum(attacker.requests.values())}
    finally:
        attacker.close()
        for n in nodes:
            n.stop()


@pytest.mark.slow
def test_eclipse_by_one_host_fails_with_diversity(monkeypatch):
    monkeypatch.setenv(LOOPBACK_ENV, "strict")
    defended = run_uvloop(_attack())
    print("defended", defended)
    assert defended["found_share"] >= 0.99, defended
    # per bucket at most 2 contacts of one IP, at most 5 in a table
    assert defended["attacker_contacts_max"] <= 5, defended

    # control: the same attack with the limits off (every loopback ip:port its own host)
    monkeypatch.setenv(LOOPBACK_ENV, "exempt")
    open_ = run_uvloop(_attack())
    print("undefended", open_)
    assert open_["attacker_contacts_max"] > 5, open_
    assert open_["found_share"] < 0.5, open_
