"""The gateway: the agent's public listener (``gateway.listen``, SPEC §5).

``app`` builds the aiohttp application the lifecycle serves there (routes come from the
components' ``add_gateway_routes``); ``component`` is the worker's service proxy, load
and upstream health; ``proxy`` the streaming reverse proxy; ``upstream`` its lean
keep-alive client; ``health`` the checks; ``kinds`` the readers of inference servers'
own health and load (vLLM, llama.cpp, TGI, Ollama, Triton) and ``upstream_load`` their
polling and the merge of what they say with the gateway's own in-flight count.
"""
