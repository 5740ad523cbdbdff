"""The Kademlia layer: signed worker records on top of the ``kademlia`` package.

See ``server.DHTNode`` (the node), ``record.WorkerRecord`` (what is stored),
``storage.ProviderStorage`` (how it is stored) and ``protocol.RMAProtocol`` (the wire,
composed of ``rpc``, ``flood_gate``, ``call_queue``, ``liveness`` and ``handlers``).
"""
