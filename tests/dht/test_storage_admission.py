"""ProviderStorage in a closed network: the admission hook and purging revoked workers."""

from __future__ import annotations

import time

from agent.admission.certificate import Certificate
from agent.admission.keys import NetworkKey
from agent.admission.policy import AdmissionPolicy
from agent.admission.revocation import RevocationList
from agent.dht.identity import Identity
from agent.dht.record import WorkerRecord, service_key
from agent.dht.storage import ProviderStorage

NK = NetworkKey.generate()
KEY = service_key("ocr")


def rec(ident: Identity, cert: bytes = b"", **kw) -> WorkerRecord:
    return WorkerRecord.create(ident, name="w", services=("ocr",), endpoint="https://w.example",
                               gpu="T4", gpu_memory_gb=16.0, load=0.0, capacity=4,
                               region="eu", ttl=60, cert=cert, **kw)


def test_hook_refuses_unadmitted_and_purge_drops_revoked() -> None:
    policy = AdmissionPolicy([NK.public_key])
    st = ProviderStorage()
    st.admit = policy.check
    good, bad = Identity.generate(), Identity.generate()
    cert = Certificate.issue(NK, good.public_key, services=("ocr",)).encode()
    assert st.put(KEY, rec(good, cert), sender=("192.0.2.1", 1)) == "stored"
    assert st.put(KEY, rec(bad), sender=("192.0.2.2", 1)) == "not_admitted"
    assert st.refused["not_admitted"] == 1
    assert [r.worker_id for r in st.get(KEY)] == [good.node_id]
    policy.add_list(RevocationList.issue(NK, [good.public_key]))
    now = time.time()
    assert st.drop_where(lambda r: policy.check(r, now) is not None) == 1
    assert st.get(KEY) == [] and len(st) == 0
    # refused from then on; its withdrawal is still taken
    assert st.put(KEY, rec(good, cert)) == "not_admitted"
    tomb = rec(good, cert).tombstone(good)
    assert st.put(KEY, tomb) == "stored"


def test_no_hook_is_an_open_network() -> None:
    st = ProviderStorage()
    assert st.put(KEY, rec(Identity.generate())) == "stored"
