"""Discovery: "which workers serve X, best first?" — answered on any agent, either role.

Modules: :mod:`.service` (the component and its lookup path: cache -> DHT ->
coordinators), :mod:`.select` (filters, ranking through ``_fast``, top-3 draw),
:mod:`.gpu_classes` (GPU class table), :mod:`.cache` (per-service cache, single-flight),
:mod:`.latency` (EWMA latency, failure back-off, health probes), :mod:`.api` (HTTP
routes) and :mod:`.client` (``rma-agent status`` / ``lookup``).
"""
