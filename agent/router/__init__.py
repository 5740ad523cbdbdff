"""The router: ``ANY /route/{service}/{path}`` on the admin API sends a caller's request
to the best worker's gateway and retries elsewhere when that is safe.

Modules: :mod:`.component` (the component: lookup, ownership check, attempts, metrics,
``/api/dht/stats`` block), :mod:`.proxy` (header rules, request bodies, retry
classification), :mod:`.budget` (the retry budget) and :mod:`.client` (``rma-agent call``).
"""
