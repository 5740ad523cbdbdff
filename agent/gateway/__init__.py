"""The gateway: the agent's public listener (``gateway.listen``, SPEC §5).

``app`` builds the aiohttp application the lifecycle serves there (routes come from the
components' ``add_gateway_routes``); ``component`` is the worker's service proxy, load
and upstream health; ``proxy`` the streaming reverse proxy; ``health`` the checks.
"""
