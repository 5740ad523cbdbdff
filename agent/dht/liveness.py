"""Contact liveness and handoff: who enters the routing table, who leaves it, and what a
newcomer is handed.

* **Verified contacts.** A request's claimed (id, address), or an id from another peer's
  node list, enters the routing table only after a ping to that address answered with
  that very id (bounded and rate-limited), so a spoofed datagram cannot fill the table
  with ids that live nowhere.
* **Ids tied to keys.** The verification is an ``identify`` RPC: the peer answers with
  its Ed25519 public key and a signature over our fresh nonce and its id
  (``identity.proven_node_id``), and the id it claimed must be the SHA-1 of that key. A
  peer cannot take an id next to a key it wants to eclipse: it must grind keys for it
  (about 2^b key generations for b chosen leading bits, where it used to pick the id).
  A peer that does not answer ``identify`` (0.2.0 and older, which drop the unknown RPC)
  is checked by ``ping`` as before and admitted as a *legacy* contact (counted in
  ``legacy_contacts``), unless ``require_keyed_ids`` (``RMA_AGENT_DHT_NODE_IDS=strict``)
  refuses it: old and new agents interoperate until every node is upgraded.
* **Dead contacts leave, live ones stay.** A contact is removed from the routing table
  only after ``dead_after`` (3) requests in a row were lost (each already retransmitted
  once by ``rpc``) *and* the first and last of them are at least ``dead_span`` (5 s)
  apart, with no answer in between. One lost datagram never removes anyone (on the links
  volunteers have, 0.5-5 % of datagrams are lost, in bursts): a routing contact that
  missed a reply is probed (pinged) at once, and once it has missed ``dead_after`` the
  last probe waits until the span is over, so a burst of loss shorter than the span
  cannot take a live contact out. Crawls skip a peer with an unanswered failure
  (``is_suspect``) meanwhile, so lookups do not wait for the rule; any answer, also a
  late one, clears the failures. ``removed_contacts`` counts removals; ``false_deaths``
  counts removed contacts that answered again within ``FALSE_DEATH_WINDOW`` (revived or
  heard from): an upper bound on live contacts removed (a peer that restarted quickly
  counts too).
* **No re-store storm.** ``welcome_if_new`` adds the contact and hands over only the keys
  for which the newcomer is now among the k closest *and* this node was the closest
  holder, at most ``HANDOFF_KEYS`` keys per newcomer, once per newcomer per minute, under
  a global token bucket of announce RPCs (kademlia re-welcomes replacement-cache contacts
  and re-stores every key to each, a self-sustaining loop at 1,000 nodes). A newcomer
  that first *pings* us (we are its seed) is handed its keys at its first request (its
  join lookup), not on the ping: pings also come from old members checking us.

* **Partitions heal.** A contact removed for missing replies goes to a bounded
  *graveyard* (``graveyard.Graveyard``). ``revive()`` (the node calls it every few
  seconds) pings the few entries that are due, each on its own back-off; one that
  answers with its id comes back into the routing table and ``on_revived`` fires (the
  node then looks itself up, so the two halves' tables re-merge through normal lookups).
  That first answer also wakes the graveyard (every entry due at once, more per tick for
  a while: the rest is most likely back too) and pings the contacts that are suspects
  (``_recheck``): the live ones are asked again at once instead of being skipped for
  ``SUSPECT_TTL``. Without revival, once a split has emptied each side's tables of the
  other side, nothing would ever cross again: plain kademlia only learns contacts from
  traffic. An empty graveyard costs nothing.

``ContactLiveness`` is one object of the protocol, given what it works on in its
constructor: the routing table and the storage, ``call`` (the protocol's way to send a
request, ``call_queue.CallQueue.call``), ``spawn``, and two hooks — ``probe_budget``
(may a verification ping go to an address that has not proven itself? the request
gate's anti-amplification budget) and ``serving`` (server mode: hand records over).
``on_revived`` is the node's callback for a contact that came back.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from kademlia.node import Node

from agent.dht.graveyard import Graveyard
from agent.dht.identity import proven_node_id
from agent.dht.rpc import QUEUE_FULL
from agent.dht.wire import _is_id
from agent.ratelimit import TokenBucket

TOMBSTONE_WINDOW = 600.0            # tombstones younger than this ride along in answers
HANDOFF_KEYS = 16                   # keys handed to one newcomer
HANDOFF_RECORDS = 64                # records handed to one newcomer
SUSPECT_TTL = 60.0                  # crawls skip a peer this long after a failure
MAX_HANDOFF_TASKS = 256             # handoff announces in flight at once
DEFER_TTL = 60.0                    # a pinging newcomer's handoff waits this long for
                                    # its first request (its join lookup follows at once)
MAX_DEFERRED = 1024
DEAD_AFTER = 3                      # lost requests in a row before a contact is removed ...
DEAD_SPAN = 5.0                     # ... the first and last at least this far apart (s)
FALSE_DEATH_WINDOW = 600.0          # a removed contact heard from within this: false death
RECHECK = 64                        # suspect contacts pinged again when a heal shows


Address = tuple[str, int]
Call = Callable[..., Awaitable[tuple[bool, Any]]]
VERIFY_PING_BYTES = 160             # an identify request (or ping) and its retransmission


class ContactLiveness:
    """Routing-table membership: verification, failure counting, handoff (see module)."""

    def __init__(self, router: Any, storage: Any, source_node: Node, ksize: int, *,
                 call: Call, my_id: Callable[[], bytes],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None],
                 serving: Callable[[], bool], drops: Counter[str],
                 probe_budget: Callable[[Address, int], bool] = lambda a, n: True,
                 limiter: TokenBucket | None = None,
                 on_revived: Callable[[Node], None] | None = None,
                 dead_after: int = DEAD_AFTER, dead_span: float = DEAD_SPAN,
                 handoff_rate: float = 20.0, require_keyed_ids: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.storage = storage
        self.source_node = source_node
        self.ksize = ksize
        self._call = call
        self._my_id = my_id
        self._spawn = spawn
        self._serving = serving
        self.drops = drops
        self._probe_budget = probe_budget
        self.on_revived = on_revived
        self.dead_after = max(1, dead_after)
        self.dead_span = max(0.0, dead_span)
        self._clock = clock
        self.require_keyed_ids = require_keyed_ids
        self.legacy_contacts = 0
        # node id -> (lost requests in a row, first loss at, last loss at)
        self._fails: dict[bytes, tuple[int, float, float]] = {}
        self._probing: set[bytes] = set()      # a liveness probe is pending or in flight
        self._amnesty_at = -1e9                 # non-contacts' failures last forgotten
        self._fail_addr: dict[Address, bytes] = {}
        self._welcomed: OrderedDict[bytes, float] = OrderedDict()
        # rate per second, burst HANDOFF_RECORDS: one newcomer gets its records at once;
        # a heal (half the network new to us at once) cannot turn into a storm
        self._handoff_bucket = TokenBucket(handoff_rate, max(handoff_rate, HANDOFF_RECORDS))
        # shared with the request gate's proof pings (one verification rate per node)
        self.limiter = limiter if limiter is not None else TokenBucket(200.0, 400.0)
        self._verifying: set[bytes] = set()
        self._upgrade: set[bytes] = set()      # in verification, then to be handed keys
        # id -> (address, when): joined by pinging us, handoff at its first request
        self._deferred: OrderedDict[bytes, tuple[Address, float]] = OrderedDict()
        self.removed_contacts = 0
        self.false_deaths = 0
        self.handoffs = 0
        self._graveyard = Graveyard()
        self._reviving: set[bytes] = set()
        self._handoff_inflight = 0
        self.revived = 0

    @property
    def verifying(self) -> int:
        """Contact checks (verification pings) in flight."""
        return len(self._verifying)

    async def identify(self, address: Address, timeout: float | None = None  # noqa: ASYNC109
                       ) -> bytes | None:
        """The node id at ``address``, proven by its key (``identify``), or, from a peer
        that does not know that RPC, the id its ``ping`` answers (a legacy contact, unless
        ``require_keyed_ids``). None: no answer, or an answer that proves nothing."""
        nonce = os.urandom(16)
        # forget=False: an old agent drops it unanswered; keep its token (``fetch_token``)
        ok, res = await self._call(address, "identify", self._my_id(), nonce, timeout=timeout,
                                   forget=False)
        if ok:
            nid = proven_node_id(res, nonce)
            if nid is None:
                self.drops["contact_key_invalid"] += 1
            return nid
        if res == QUEUE_FULL:
            return None
        ok, res = await self._call(address, "ping", self._my_id(), timeout=timeout)
        if not (ok and _is_id(res)):
            return None
        if self.require_keyed_ids:
            self.drops["contact_unkeyed"] += 1
            return None
        self.legacy_contacts += 1
        return bytes(res)

    async def ping(self, node: Node) -> tuple[bool, Any]:
        """Ping a contact, counting the outcome (``handle_call_response``)."""
        result = await self._call((node.ip, node.port), "ping", self._my_id())
        return self.handle_call_response(result, node)

    async def announce(self, node: Node, key: bytes, record: bytes) -> tuple[bool, Any]:
        """Offer one encoded record to ``node``, counting the outcome."""
        result = await self._call((node.ip, node.port), "announce", self._my_id(), key, record)
        return self.handle_call_response(result, node)

    def welcome_sender(self, sender: Address, nodeid: bytes, *, handoff: bool = True,
                       first_contact: bool = False, joining: bool = False) -> None:
        """A request's claimed (id, address) is unverified: a spoofed datagram could fill
        the routing table with ids that live nowhere. Ping the address first and add the
        contact only if it answers with that id (bounded and rate-limited).

        ``handoff``: hand keys over once verified. True for a peer that sent us a request
        (a newcomer announces itself so: its join lookups), False for one we only heard
        of in an answer to our own query — after our own join those are old members that
        hold their keys already, and a young node handing each of them its keys was a
        join storm (~80 announces from one newcomer in a 24-node network).

        ``first_contact``: a ping from an id we never knew (not a contact lost earlier);
        ``joining``: a lookup of the sender's own id (Kademlia's join). A newcomer joins
        by pinging its seed, then looking itself up through it: the seed's handoff is
        deferred from the ping to that lookup (``DEFER_TTL``). Without this a seed that
        was the closest holder of a key added the newcomer on its ping, with no handoff,
        then heard its join lookup from a known contact: nobody handed the key over (the
        newcomer held none of the key's records until the owners republished). Only a
        join lookup releases a deferred handoff: old members' pings are first contacts
        too (a reply and the ping that checks us can cross), and their other requests
        (a holder's own handoff announces) must not be answered with a handoff back."""
        if not nodeid or nodeid == self.source_node.id:
            return
        node = Node(nodeid, sender[0], sender[1])
        if nodeid in self._verifying:
            if joining:
                self._upgrade.add(nodeid)    # its verification is in flight: hand off then
            return
        if not self.router.is_new_node(node):
            if joining and self._deferred:
                self._deferred_handoff(node)
            return
        if len(self._verifying) >= 256 or not self.limiter.take():
            self.drops["contact_unverified"] += 1
            return
        self._verifying.add(nodeid)
        defer = first_contact and not handoff and nodeid not in self._graveyard
        self._spawn(self._verify_contact(node, handoff, defer))

    def _deferred_handoff(self, node: Node) -> None:
        """A known contact looks itself up: if it first pinged us (a deferred handoff,
        same address, within ``DEFER_TTL``), consider the handoff now, once."""
        hit = self._deferred.pop(node.id, None)
        if hit is None:
            return
        addr, at = hit
        if addr == (node.ip, node.port) and time.monotonic() - at < DEFER_TTL:
            self._consider_handoff(node)

    async def _verify_contact(self, node: Node, handoff: bool = True,
                              defer: bool = False) -> None:
        """Ping the claimed address — up to two datagrams with the retransmission. For
        an address that has not proven it receives there, that counts against its byte
        budget (``probe_budget``): a spoofed request must not buy more than 2.5x its
        size. Checked here, in the task, so the request's own reply is budgeted first."""
        if not self._probe_budget((node.ip, node.port), VERIFY_PING_BYTES):
            self._verifying.discard(node.id)
            self._upgrade.discard(node.id)
            self.drops["verify_budget"] += 1
            return
        try:
            nid = await self.identify((node.ip, node.port))
            upgraded = defer and node.id in self._upgrade
            if nid == node.id:
                if defer and not upgraded and self.router.is_new_node(node):
                    self._deferred[node.id] = ((node.ip, node.port), time.monotonic())
                    while len(self._deferred) > MAX_DEFERRED:
                        self._deferred.popitem(last=False)
                self.welcome_if_new(node, handoff=handoff or upgraded)
            elif nid is not None:
                self.drops["contact_id_mismatch"] += 1
        finally:
            self._verifying.discard(node.id)
            self._upgrade.discard(node.id)

    def welcome_if_new(self, node: Node, *, handoff: bool = True) -> None:
        """Add ``node`` to the routing table; hand over only the keys it now should hold.

        Fixes kademlia's storm: the replacement-cache re-welcome and the full re-store of
        every key on every new contact (see module docstring)."""
        if node.id == self.source_node.id or len(node.id) != 20:
            return
        if not self.router.is_new_node(node):
            return
        self.router.add_contact(node)
        if node.id in self._graveyard:
            self._returned(node)    # no handoff either: an old member (see _revive)
        elif handoff:
            self._consider_handoff(node)

    def _consider_handoff(self, node: Node) -> None:
        """Hand ``node`` the keys it should now hold, at most once a minute per node."""
        if not self._serving() or not len(self.storage):
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
                if self._handoff_inflight >= MAX_HANDOFF_TASKS or not self._handoff_bucket.take():
                    self.drops["handoff_limited"] += 1
                    return
                self._handoff_inflight += 1
                self._spawn(self._handoff_one(node, key, enc))
                budget -= 1
                self.handoffs += 1
            keys_sent += 1

    async def _handoff_one(self, node: Node, key: bytes, enc: bytes) -> None:
        try:
            await self.announce(node, key, enc)
        finally:
            self._handoff_inflight -= 1

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """Count the outcome for ``node``; remove it by the rule (see module)."""
        if not result[0] and result[1] == QUEUE_FULL:
            return result  # our own backlog, not the peer's fault
        if not result[0]:
            self._failed(node)
            return result
        if self._fails:
            self._fails.pop(node.id, None)
        # The id came from another peer's node list: an answer from that address does not
        # prove it (a liar can pair a made-up id with an honest node's address), so a new
        # contact enters the table only after a ping answered with that very id.
        self.welcome_sender((node.ip, node.port), node.id, handoff=False)
        return result

    def _failed(self, node: Node) -> None:
        """A request to ``node`` was lost (after its retransmission)."""
        now = self._clock()
        count, first, _last = self._fails.get(node.id, (0, now, now))
        count += 1
        self._fails[node.id] = (count, first, now)
        self._fail_addr[(node.ip, node.port)] = node.id
        if len(self._fails) > 8192:
            self._prune_fails()
        if count >= self.dead_after and now - first >= self.dead_span:
            self.declare_dead(node)
            return
        if node.id in self._probing or self.router.is_new_node(node):
            return                          # a probe is out already; not a contact
        # a routing contact missed a reply: probe it rather than wait for the next lookup
        # to stumble on it (crawls skip suspects, so that may never come); once it missed
        # ``dead_after``, the last probe waits for the end of the span
        delay = 0.0 if count < self.dead_after else first + self.dead_span - now
        if self.limiter.take():
            self._probing.add(node.id)
            self._spawn(self._probe(node, delay))

    async def _probe(self, node: Node, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            if node.id not in self._fails:
                return                      # it answered something meanwhile
            result = await self._call((node.ip, node.port), "ping", self._my_id())
        finally:
            self._probing.discard(node.id)
        self.handle_call_response(result, node)

    def declare_dead(self, node: Node) -> None:
        """Remove ``node`` from the routing table and remember it for revival (what the
        rule does; a test or harness may apply it at once for a known-dead peer)."""
        live = node in self.router
        try:
            self.router.remove_contact(node)    # also from its bucket's replacement cache
        except Exception:  # a contact not in the table
            pass
        if live:
            self.removed_contacts += 1
        self._bury(node)

    def _prune_fails(self) -> None:
        cutoff = self._clock() - SUSPECT_TTL
        self._fails = {k: v for k, v in self._fails.items() if v[2] >= cutoff}
        self._fail_addr = {a: i for a, i in self._fail_addr.items() if i in self._fails}

    def alive(self, address: Address) -> None:
        """A (late) reply came from ``address``: whatever timed out there was our
        congestion, not a dead peer — forget its failures."""
        nid = self._fail_addr.pop(address, None)
        if nid is not None:
            self._fails.pop(nid, None)

    def is_suspect(self, node_id: bytes) -> bool:
        """Failed recently without answering since: crawls skip such peers."""
        f = self._fails.get(node_id)
        return f is not None and self._clock() - f[2] < SUSPECT_TTL

    def live_neighbors(self, target: Node, k: int, exclude: Node | None = None) -> list[Node]:
        """The ``k`` contacts nearest ``target`` with no unanswered failure, nearest
        first: what answers name and where our own lookups start. A contact that missed
        a reply stays in the table for the removal rule's span, and only this node knows
        it failed: named in an answer, it costs each asker a timeout of its own (N = 300,
        global-lossy, after 30 % died: almost no dead node a crawl asked was suspect at
        the asker; most came from answers)."""
        if not self._fails:
            return self.router.find_neighbors(target, k=k, exclude=exclude)
        near = self.router.find_neighbors(target, k=k + min(len(self._fails), k),
                                          exclude=exclude)
        return [n for n in near if not self.is_suspect(n.id)][:k]

    def _bury(self, node: Node) -> None:
        """Remember a removed contact for revival pings (``graveyard``)."""
        self._graveyard.bury(node)

    def _unbury(self, node_id: bytes) -> None:
        """A removed contact proved alive again: out of the graveyard, and a false death
        if it was removed less than ``FALSE_DEATH_WINDOW`` ago."""
        buried = self._graveyard.unbury(node_id)
        if buried is not None and time.monotonic() - buried < FALSE_DEATH_WINDOW:
            self.false_deaths += 1

    def revive(self) -> int:
        """Ping the removed contacts that are due (``Graveyard.due``); returns how many
        pings were started. Called periodically by the node."""
        if not len(self._graveyard):
            return 0
        nodes = self._graveyard.due(self._reviving)
        for node in nodes:
            self._reviving.add(node.id)
            self._spawn(self._revive(node))
        return len(nodes)

    async def _revive(self, node: Node) -> None:
        try:
            ok, res = await self._call((node.ip, node.port), "ping", self._my_id())
        finally:
            self._reviving.discard(node.id)
        if ok and res == node.id:
            self._fails.pop(node.id, None)
            if not self.router.is_new_node(node):   # back in the table meanwhile
                self._unbury(node.id)
            # no handoff: a revived contact is an old member (after a heal, all of the
            # other half at once: a storm); owners' republishes re-spread records
            self.welcome_if_new(node, handoff=False)

    def _returned(self, node: Node) -> None:
        """A removed contact is back in the table — our revival ping answered, or its own
        request did and its id was verified (the other half's pings may reach us first):
        a healed partition, most likely. The rest of the graveyard is woken; crawls skip
        suspects for SUSPECT_TTL, so the failures of peers that are not contacts are
        forgotten and suspect contacts pinged again (``_recheck``; at most once per
        SUSPECT_TTL / 6: a dead one's removal is not delayed)."""
        self._unbury(node.id)
        self.revived += 1
        self._graveyard.wake()
        now = self._clock()
        if now - self._amnesty_at >= SUSPECT_TTL / 6:
            self._amnesty_at = now
            router = self.router
            contacts = []
            for nid in [i for i in self._fails if i not in self._probing]:
                if router.is_new_node(Node(nid)) if len(nid) == 20 else True:
                    del self._fails[nid]
                else:
                    contacts.append(nid)
            self._recheck(contacts)
        if self.on_revived is not None:
            self.on_revived(node)

    def _recheck(self, ids: list[bytes]) -> None:
        """Ping suspect contacts at once (at most ``RECHECK``, under the verification
        rate): after a heal the live ones stop being skipped now, not ``SUSPECT_TTL``
        later; a dead one's loss counts toward its removal as any other."""
        where = {nid: addr for addr, nid in self._fail_addr.items()}
        for nid in ids[:RECHECK]:
            addr = where.get(nid)
            if addr is None or not self.limiter.take():
                continue
            self._probing.add(nid)
            self._spawn(self._probe(Node(nid, addr[0], addr[1]), 0.0))

    def housekeeping(self) -> None:
        self._prune_fails()
        cutoff = time.monotonic() - DEFER_TTL
        while self._deferred and next(iter(self._deferred.values()))[1] < cutoff:
            self._deferred.popitem(last=False)
        cutoff = time.monotonic() - 60.0
        while self._welcomed:
            k, t = next(iter(self._welcomed.items()))
            if t >= cutoff:
                break
            del self._welcomed[k]

    def stats(self) -> dict[str, Any]:
        return {"removed_contacts": self.removed_contacts, "false_deaths": self.false_deaths,
                "handoffs": self.handoffs,
                "graveyard": len(self._graveyard), "revived": self.revived,
                "heal_wakes": self._graveyard.wakes,
                "legacy_contacts": self.legacy_contacts}
