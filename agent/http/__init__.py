"""HTTP rules shared by every listener and proxy of the agent.

- :mod:`agent.http.forwarding` — what a proxy passes on (hop-by-hop headers, the path
  rule that keeps a request inside an upstream's prefix); the gateway and the router both
  use it, so the two can never disagree again.
- :mod:`agent.http.listener` — the aiohttp listeners (admin and public) with timeouts,
  connection caps and a bound on heads in progress; :mod:`agent.http.budget` holds the
  numbers (and derives the caps from ``RLIMIT_NOFILE``), :mod:`agent.http.connections`
  the per-listener bookkeeping (eviction, deadlines, shed metrics and journal lines).
- :mod:`agent.http.body` — a request body read to its end but never past a limit (the
  coordinator's registration and the enrollment endpoint).
- :mod:`agent.http.local_caller` — which admin requests only this box may make.
- :mod:`agent.http.same_site` — the admin API refuses cross-site requests that change state.
"""
