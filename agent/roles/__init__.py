"""The two roles an agent can play (SPEC §1): a GPU ``worker`` (``worker.WorkerRole``)
or a stable ``coordinator`` (``coordinator.CoordinatorRole``). The lifecycle's component
table picks the one ``agent.role`` names."""
