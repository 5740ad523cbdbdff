"""Contact liveness and handoff: who enters the routing table, who leaves it, and what a
newcomer is handed.

* **Verified contacts.** A request's claimed (id, address), or an id from another peer's
  node list, enters the routing table only after a ping to that address answered with
  that very id (bounded and rate-limited), so a spoofed datagram cannot fill the table
  with ids that live nowhere.
* **Dead contacts leave fast**: a routing contact that misses a reply is pinged at once;
  after ``dead_after`` consecutive misses (default 2, i.e. about half a second) it is
  removed from the routing table. Crawls skip peers that failed recently
  (``is_suspect``), and any late reply clears a peer's failures.
* **No re-store storm.** ``welcome_if_new`` adds the contact and hands over only the keys
  for which the newcomer is now among the k closest *and* this node was the closest
  holder, at most ``HANDOFF_KEYS`` keys per newcomer, once per newcomer per minute, under
  a global token bucket of announce RPCs (kademlia re-welcomes replacement-cache contacts
  and re-stores every key to each, a self-sustaining loop at 1,000 nodes).

``ContactLiveness`` is a mixin of the protocol: it uses the RPC engine's ``_call`` and
``_spawn`` and the protocol's ``router``, ``storage`` and ``call_*`` methods.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from kademlia.node import Node

from agent.ratelimit import TokenBucket

TOMBSTONE_WINDOW = 600.0            # tombstones younger than this ride along in answers
HANDOFF_KEYS = 16                   # keys handed to one newcomer
HANDOFF_RECORDS = 64                # records handed to one newcomer
SUSPECT_TTL = 60.0                  # crawls skip a peer this long after a failure


class ContactLiveness:
    """Routing-table membership: verification, failure counting, handoff (see module)."""

    router: Any
    storage: Any
    source_node: Node
    ksize: int
    mode: str
    drops: Any

    def _init_liveness(self, *, dead_after: int, handoff_rate: float) -> None:
        self.dead_after = dead_after
        self._fails: dict[bytes, tuple[int, float]] = {}
        self._fail_addr: dict[tuple[str, int], bytes] = {}
        self._welcomed: OrderedDict[bytes, float] = OrderedDict()
        self._handoff_bucket = TokenBucket(handoff_rate, handoff_rate)
        self._verify_bucket = TokenBucket(200.0, 400.0)
        self._verifying: set[bytes] = set()
        self.removed_contacts = 0
        self.handoffs = 0

    def _sender(self, sender: tuple[str, int], nodeid: bytes) -> Node | None:
        if not nodeid or nodeid == self.source_node.id:
            return None
        return Node(nodeid, sender[0], sender[1])

    def _welcome_sender(self, sender: tuple[str, int], nodeid: bytes) -> None:
        """A request's claimed (id, address) is unverified: a spoofed datagram could fill
        the routing table with ids that live nowhere. Ping the address first and add the
        contact only if it answers with that id (bounded and rate-limited)."""
        if not nodeid or nodeid == self.source_node.id:
            return
        node = Node(nodeid, sender[0], sender[1])
        if not self.router.is_new_node(node) or nodeid in self._verifying:
            return
        if len(self._verifying) >= 256 or not self._verify_bucket.take():
            self.drops["contact_unverified"] += 1
            return
        self._verifying.add(nodeid)
        self._spawn(self._verify_contact(node))

    async def _verify_contact(self, node: Node) -> None:
        try:
            ok, res = await self._call((node.ip, node.port), "ping", self.my_id())
            if ok and res == node.id:
                self.welcome_if_new(node)
            elif ok:
                self.drops["contact_id_mismatch"] += 1
        finally:
            self._verifying.discard(node.id)

    def welcome_if_new(self, node: Node) -> None:
        """Add ``node`` to the routing table; hand over only the keys it now should hold.

        Fixes kademlia's storm: the replacement-cache re-welcome and the full re-store of
        every key on every new contact (see module docstring)."""
        if node.id == self.source_node.id or len(node.id) != 20:
            return
        if not self.router.is_new_node(node):
            return
        self.router.add_contact(node)
        if self.mode != "server" or not len(self.storage):
            return
        now = time.monotonic()
        last = self._welcomed.get(node.id)
        if last is not None and now - last < 60.0:
            return
        self._welcomed[node.id] = now
        if len(self._welcomed) > 4096:
            self._welcomed.popitem(last=False)
        self._handoff(node)

    def _handoff(self, node: Node) -> None:
        me = self.source_node
        budget = HANDOFF_RECORDS
        keys_sent = 0
        for key in self.storage.keys()[:256]:
            if keys_sent >= HANDOFF_KEYS or budget <= 0:
                break
            target = Node(key)
            neighbors = self.router.find_neighbors(target, k=self.ksize)
            if not any(n.id == node.id for n in neighbors):
                continue  # the newcomer is not among the k closest we know
            d_self = me.distance_to(target)
            if any(n.id != node.id and n.distance_to(target) < d_self for n in neighbors):
                continue  # a closer holder than us will hand it over
            recs = (self.storage.tombstones(key, since=time.time() - TOMBSTONE_WINDOW)
                    + self.storage.get_encoded(key, limit=budget))
            for enc in recs[:budget]:
                if not self._handoff_bucket.take():
                    return
                self._spawn(self.call_announce(node, key, enc))
                budget -= 1
                self.handoffs += 1
            keys_sent += 1

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """Count the outcome for ``node``; remove it after ``dead_after`` straight timeouts."""
        if not result[0]:
            fails = self._fails.get(node.id, (0, 0.0))[0] + 1
            self._fails[node.id] = (fails, time.monotonic())
            self._fail_addr[(node.ip, node.port)] = node.id
            if len(self._fails) > 8192:
                self._prune_fails()
            if fails >= self.dead_after:
                try:
                    self.router.remove_contact(node)
                    self.removed_contacts += 1
                except Exception:  # a contact not in the table
                    pass
            elif not self.router.is_new_node(node) and self._verify_bucket.take():
                # a routing contact missed a reply: ping it now rather than wait for the
                # next lookup to stumble on it (crawls skip suspects, so that may never
                # come) — a dead contact leaves after ``dead_after`` misses in a row
                self._spawn(self.call_ping(node))
            return result
        if self._fails:
            self._fails.pop(node.id, None)
        # The id came from another peer's node list: an answer from that address does not
        # prove it (a liar can pair a made-up id with an honest node's address), so a new
        # contact enters the table only after a ping answered with that very id.
        self._welcome_sender((node.ip, node.port), node.id)
        return result

    def _prune_fails(self) -> None:
        cutoff = time.monotonic() - SUSPECT_TTL
        self._fails = {k: v for k, v in self._fails.items() if v[1] >= cutoff}
        self._fail_addr = {a: i for a, i in self._fail_addr.items() if i in self._fails}

    def _alive(self, address: tuple[str, int]) -> None:
        """A (late) reply came from ``address``: whatever timed out there was our
        congestion, not a dead peer — forget its failures."""
        nid = self._fail_addr.pop(address, None)
        if nid is not None:
            self._fails.pop(nid, None)

    def is_suspect(self, node_id: bytes) -> bool:
        """Failed recently without answering since: crawls skip such peers."""
        f = self._fails.get(node_id)
        return f is not None and time.monotonic() - f[1] < SUSPECT_TTL

    def housekeeping(self) -> None:
        self._prune_fails()
        cutoff = time.monotonic() - 60.0
        while self._welcomed:
            k, t = next(iter(self._welcomed.items()))
            if t >= cutoff:
                break
            del self._welcomed[k]
