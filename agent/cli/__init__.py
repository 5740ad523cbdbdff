"""The ``rma-agent`` command line (SPEC §3), one module per command group:

* ``commands``      the parser, and which module runs each command;
* ``common``        loading the config (errors printed, exit 2), the agent's URL, one JSON
                    GET with readable failures, tables, the service-name rule;
* ``status``        ``rma-agent status``;
* ``lookup``        ``rma-agent lookup [--explain]``;
* ``watch``         ``rma-agent watch``;
* ``call``          ``rma-agent call`` (one request through the local router);
* ``admission``     ``identity``, ``network-key create``, ``admit`` (``--issuer`` too),
                    ``revoke`` and ``check-config``'s certificate checks;
* ``token``         ``token create|list|revoke`` (enrollment tokens, on a coordinator);
* ``join``          ``rma-agent join URL`` (one command from a fresh install to a worker
                    found), with ``join_config`` (the config it writes and when it may
                    replace one), ``join_detect`` (inference servers on their default
                    ports), ``join_net`` (seeds, enrollment, the wait until found) and
                    ``join_system`` (identity and state files for the service user,
                    systemctl);
* ``demo``          ``rma-agent demo`` (with ``demo_cluster``, ``demo_routing`` and the
                    GPU stand-ins of ``demo_services``);
* ``demo_inference`` an emulated GPU inference server (slots, queue, heavy-tailed
                    service times, owner load, streams, vLLM ``/metrics``): the demo's
                    upstreams, ``bench/balance.py``'s servers and a test fixture.

``main`` is the console script (``agent.cli:main``) and ``python -m agent``. It imports
the parser only when called, so importing a helper module (``agent.cli.common``) does
not load every command.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    from agent.cli.commands import main as run
    return run(argv)
