"""Which versions of rma-agent the fleet runs, as far as this agent can see.

Why: a fleet is kept current by apt and unattended-upgrades, and a box that stopped
upgrading (a broken sources file, an expired key, a held package) only shows from the
outside. Every worker record (format v2) carries its worker's ``agent_version``; this
component counts the versions of the distinct workers whose records this agent's DHT node
stores (the ``"record"`` bus event, emitted by the storage for every record it accepts —
on a coordinator that is most of the network, on other nodes the sample near their id).
Each worker counts once, with its newest record, until that record expires; withdrawn
workers are dropped; this agent's own record is not a peer.

``/api/dht/stats`` gets a ``"versions"`` block::

    {"local": "0.2.0", "peers": {"0.2.0": 7, "0.3.0": 12, "": 1}, "sampled": 20,
     "newer": 12, "outdated": true}

``""`` is a v1 (legacy) record, which names no version. ``outdated`` is true when a strict
majority of the sampled peers run a newer version than this agent; STATUS= then says so
and ``rma-agent status`` warns (it reads this block).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.component import Component
from agent.dht.record import MAX_TTL
from agent.discovery.select import record_max_age

if TYPE_CHECKING:
    from agent.interfaces import AgentAPI

MAX_TRACKED = 4096      # distinct workers remembered (oldest forgotten first)
_NUM = re.compile(r"\d+")


def version_key(version: str) -> tuple[int, ...]:
    """A sortable key for "0.2.0", "0.10.1", "1.0rc1" (release numbers only; "" sorts first).

    Deliberately simple: agent versions are plain dotted numbers (pyproject.toml), and a
    pre-release suffix only has to sort next to its release, not before it.
    """
    out: list[int] = []
    for part in version.split("."):
        m = _NUM.match(part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


def summarize(local: str, peers: dict[str, int]) -> dict[str, Any]:
    """The ``versions`` stats block for ``peers`` ({version: workers})."""
    sampled = sum(peers.values())
    lk = version_key(local)
    newer = sum(n for v, n in peers.items() if version_key(v) > lk)
    return {"local": local, "peers": dict(sorted(peers.items(), key=lambda kv: version_key(kv[0]))),
            "sampled": sampled, "newer": newer, "outdated": sampled > 0 and 2 * newer > sampled}


class VersionsComponent(Component):
    """Counts the agent versions of the workers whose records this node stores."""

    name = "versions"

    def __init__(self, agent: AgentAPI, clock: Any = time.time) -> None:
        super().__init__(agent)
        self.clock = clock
        # worker id -> (seq, agent_version, live until), least recently updated first
        self._seen: OrderedDict[bytes, tuple[int, str, float]] = OrderedDict()

    async def start(self) -> None:
        self.agent.subscribe("record", self.observe)

    def _own_id(self) -> bytes | None:
        dht = self.agent.dht
        identity = dht.identity if dht is not None else None
        return identity.node_id if identity is not None else None

    def observe(self, record: Any) -> None:
        """A record this node stored (bus event). Never raises: it runs inside storage."""
        try:
            wid = bytes(record.worker_id)
            if wid == self._own_id():
                return
            cur = self._seen.get(wid)
            if cur is not None and cur[0] >= record.seq:
                return
            if record.withdrawn:
                self._seen.pop(wid, None)
                return
            # live until expiry or until stale by its own refresh (what lookups offer),
            # so a worker gone without a goodbye leaves the sample with it
            live_until = min(float(record.expires_at),
                             float(record.issued_at) + record_max_age(record, MAX_TTL))
            self._seen[wid] = (int(record.seq), str(record.agent_version),
                               live_until)
            self._seen.move_to_end(wid)
            while len(self._seen) > MAX_TRACKED:
                self._seen.popitem(last=False)
        except Exception:  # a malformed record object must not break the storage path
            return

    def peers(self) -> dict[str, int]:
        """{version: live workers}; expired entries are dropped on the way."""
        now = self.clock()
        out: dict[str, int] = {}
        for wid, (_seq, version, expires) in list(self._seen.items()):
            if expires <= now:
                del self._seen[wid]
                continue
            out[version] = out.get(version, 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        return summarize(__version__, self.peers())

    def status(self) -> str:
        s = self.summary()
        if s["outdated"]:
            return f"v{__version__} (OUTDATED: {s['newer']} of {s['sampled']} peers run newer)"
        return f"v{__version__}"

    def stats(self) -> dict[str, Any]:
        return {"versions": self.summary()}
