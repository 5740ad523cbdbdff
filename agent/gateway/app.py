"""The gateway's aiohttp application: only what a public listener may serve.

Why a second application and not a path prefix on the admin one: what the tunnel or a
public TLS proxy reaches must not be able to reach the admin API by any path, header or
encoding trick. The gateway app has no admin route at all — components register the few
public ones through ``Component.add_gateway_routes`` (a worker: its service proxy and the
ownership proof; a coordinator: register, registry and the seed list) and everything else
is a 404 JSON from the same error middleware as the admin API.
"""

from __future__ import annotations

from aiohttp import web

from agent.httpapi import AGENT_KEY, ServedAgent, json_errors

# Only the coordinator's registration reads a body into memory (bounded by itself too);
# the service proxy streams and never calls request.read().
CLIENT_MAX_SIZE = 64 * 1024


def make_gateway_app(agent: ServedAgent) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=CLIENT_MAX_SIZE)
    app[AGENT_KEY] = agent
    for component in agent.components:
        component.add_gateway_routes(app)
    return app
