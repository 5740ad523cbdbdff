"""Discovery: "which workers serve X, best first?" — answered on any agent, either role.

Modules: :mod:`.service` (the component: cache, single-flight, ranking, its public
interface), :mod:`.sources` (the miss path: DHT -> coordinators -> last-known-good),
:mod:`.select` (filters, ranking through ``_fast``, top-3 draw), :mod:`.gpu_classes`
(GPU class table), :mod:`.cache` (per-service cache), :mod:`.latency` (EWMA latency,
failure back-off, health probes), :mod:`.api` (HTTP routes) and :mod:`.router_view`
(discovery as the router sees it). The commands (``rma-agent status`` / ``lookup``) live
in :mod:`agent.cli`; docs/DESIGN.md lists every module.
"""
