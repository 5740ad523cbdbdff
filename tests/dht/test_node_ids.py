"""Node ids are tied to keys on the wire (issue 20, item 6): a contact enters a routing
table only when its id is the SHA-1 of a key it proves it holds (``identify``); agents
that predate the RPC still interoperate as counted legacy contacts, or are refused under
``require_keyed_ids``. Real DHTNodes on 127.0.0.1 (real UDP)."""

from __future__ import annotations

import os

from kademlia.node import Node

from agent.dht.identity import Identity, proven_node_id
from agent.dht.record import service_key
from agent.dht.server import DHTNode
from tests.util import run_uvloop, wait_for_async


def _ids(node: DHTNode) -> set[bytes]:
    assert node.protocol is not None
    return {n.id for n in node.protocol.router.all_contacts()}


def test_proof_binds_the_nonce_and_the_key():
    ident = Identity.generate()
    nonce = os.urandom(16)
    proof = ident.node_id_proof(nonce)
    assert proven_node_id(proof, nonce) == ident.node_id
    assert proven_node_id(proof, os.urandom(16)) is None              # replayed proof
    other = Identity.generate()
    assert proven_node_id({"key": other.public_key, "sig": proof["sig"]}, nonce) is None
    for junk in (None, b"x", {"key": b"k"}, {"key": ident.public_key, "sig": 5}):
        assert proven_node_id(junk, nonce) is None


def test_a_chosen_id_next_to_a_service_key_is_refused():
    """A peer that claims an id it picked (here: the service key itself, the closest id
    there is) is not added: its key does not hash to that id. With ping-only checks (the
    code before this test) the peer answered the ping with its claimed id and entered
    the table."""
    async def scenario():
        honest = DHTNode(Identity.generate())
        liar_ident = Identity.generate()
        chosen = service_key("llm-inference")
        liar_ident.node_id = chosen             # what a modified agent would claim
        liar = DHTNode(liar_ident)
        await honest.listen(0, "127.0.0.1")
        await liar.listen(0, "127.0.0.1")
        try:
            assert liar.protocol is not None and honest.protocol is not None
            target = Node(honest.node.id, "127.0.0.1", honest.port)
            ok, _ = await liar.protocol.call_find_node(target, Node(os.urandom(20)))
            assert ok                                      # the request was answered ...
            drops = honest.protocol.drops
            await wait_for_async(lambda: drops["contact_key_invalid"]
                                 + drops["contact_id_mismatch"] >= 1, timeout=20,
                                 what="the liar's contact check refused")
            assert chosen not in _ids(honest)              # ... but the id was refused
            assert honest.stats()["legacy_contacts"] == 0
        finally:
            honest.stop()
            liar.stop()

    run_uvloop(scenario())


def _make_old(node: DHTNode) -> None:
    """An agent from before ``identify`` (0.2.0): it drops the unknown RPC unanswered."""
    assert node.protocol is not None
    node.protocol.engine.handlers.pop("identify")


def test_old_agents_interoperate_as_legacy_contacts_and_strict_refuses_them():
    async def scenario():
        new = DHTNode(Identity.generate())
        strict = DHTNode(Identity.generate(), require_keyed_ids=True)
        old = DHTNode(Identity.generate())
        for n in (new, strict, old):
            await n.listen(0, "127.0.0.1")
        _make_old(old)
        try:
            # a new agent joins through an old seed: identify goes unanswered, ping works
            assert await new.bootstrap([("127.0.0.1", old.port)]) == 1
            assert old.node.id in _ids(new)
            assert new.stats()["legacy_contacts"] == 1
            # the old agent verified the new one with ping, as it always did
            await wait_for_async(lambda: new.node.id in _ids(old), timeout=20,
                                 what="the old agent taking the new one as a contact")
            # a node that requires keyed ids does not take the old agent as a contact
            assert await strict.bootstrap([("127.0.0.1", old.port)]) == 0
            assert strict.protocol is not None
            assert strict.protocol.drops["contact_unkeyed"] >= 1
            # ... but a new one, proven by its key, it does
            assert await strict.bootstrap([("127.0.0.1", new.port)]) >= 1
            assert new.node.id in _ids(strict)
            assert strict.stats()["legacy_contacts"] == 0
        finally:
            for n in (new, strict, old):
                n.stop()

    run_uvloop(scenario())
