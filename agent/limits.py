"""Field limits of a signed worker record, shared by the record codec and the config.

Why a module of its own: the config parser refuses values that would not fit a record
(a name, region or endpoint too long, too many services, a TTL past the cap), and the
DHT's record codec enforces the same numbers on the wire. Both import them from here,
below both, so ``agent.config`` does not import ``agent.dht`` (which imports
``agent.config``).
"""

from __future__ import annotations

MAX_TTL = 3600.0            # a record may not claim to live longer than this (seconds)
MAX_NAME = 64               # agent/worker name, UTF-8 bytes
MAX_ENDPOINT = 256          # the worker's public URL
MAX_REGION = 32
MAX_GPU = 32
MAX_SERVICE = 63            # one service name
MAX_SERVICES = 16           # services in one record
