"""``rma-agent`` command line (SPEC §3): the parser and which module runs each command.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage/config. Each command group lives in its
own module (``status``, ``lookup``, ``watch``, ``call``, ``admission``, ``token``,
``join``, ``demo``), imported only when its command runs, so ``rma-agent status`` does not load the daemon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import agent.cli.admission as admission
import agent.cli.join as join
import agent.cli.token as token
from agent import __version__
from agent.cli.common import default_url, load_config_or_report
from agent.config import default_path, summary


def _config_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", type=Path, default=None, metavar="PATH",
                    help="config file (default $RMA_AGENT_CONFIG or /etc/rma-agent/agent.toml)")


def _url_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--url", default=None, help="agent HTTP URL (default: from the config)")


def _query_parsers(sub: argparse._SubParsersAction) -> None:
    """``status``, ``lookup``, ``watch``, ``call``: the commands that ask a running agent."""
    sp = sub.add_parser("status", help="the local agent's state")
    _url_arg(sp)
    sp.add_argument("--json", action="store_true", help="print raw JSON")
    sp = sub.add_parser("lookup", help="ranked workers for a service")
    sp.add_argument("service")
    _url_arg(sp)
    sp.add_argument("--limit", type=int, default=10, metavar="N")
    sp.add_argument("--region", default=None)
    sp.add_argument("--gpu", default=None)
    sp.add_argument("--json", action="store_true", help="print raw JSON")
    sp.add_argument("--explain", action="store_true",
                    help="score components of each worker and why others were left out")
    sp = sub.add_parser("watch", help="print a service's membership changes as they happen")
    sp.add_argument("service")
    _url_arg(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per event")
    sp = sub.add_parser("call", help="send one request through the local agent's router")
    sp.add_argument("service")
    sp.add_argument("path", help="path on the service, e.g. /v1/ocr")
    sp.add_argument("--data", default=None, metavar="@FILE|TEXT",
                    help="request body: @FILE streams a file, otherwise the text itself")
    sp.add_argument("--header", action="append", default=[], metavar="K:V",
                    help="request header (repeatable), e.g. RMA-Region:eu-west")
    sp.add_argument("-X", "--method", default=None, help="HTTP method (default GET, POST "
                    "with --data)")
    _url_arg(sp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rma-agent", description=(
        "Peer-to-peer discovery agent of the RMA platform (worker or coordinator role)."))
    p.add_argument("--version", action="version", version=f"rma-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _config_arg(sub.add_parser("run", help="run the daemon"))
    _config_arg(sub.add_parser("check-config", help="validate the config and exit"))
    _query_parsers(sub)
    sp = sub.add_parser("demo", help="a local cluster on loopback; Ctrl-C stops it")
    sp.add_argument("--workers", type=int, default=5, metavar="N")
    admission.add_parsers(sub, _config_arg)
    token.add_parsers(sub, _config_arg)
    join.add_parser(sub, _config_arg)
    return p


def _run_or_check(command: str, path: Path) -> int:
    """``run`` and ``check-config``: both start by loading the config (errors: exit 2)."""
    cfg = load_config_or_report(path)
    if cfg is None:
        return 2
    if command == "run":
        from agent.run import main as run_main
        return run_main(path, cfg)
    errors, warnings = admission.check_config_admission(cfg, path)
    for line in errors + warnings:
        print(line, file=sys.stderr)
    if errors:
        return 2
    print(f"{path}: {summary(cfg)}")
    return 0


def _query(args: argparse.Namespace) -> int:
    """The commands that ask a running agent (``--url``, default from the config)."""
    url = args.url or default_url()
    if args.command == "status":
        from agent.cli.status import cmd_status
        return cmd_status(url, args.json)
    if args.command == "lookup":
        if args.limit < 1:
            print("rma-agent lookup: --limit must be at least 1", file=sys.stderr)
            return 2
        from agent.cli.lookup import cmd_lookup, cmd_lookup_explain
        run = cmd_lookup_explain if args.explain else cmd_lookup
        return run(url, args.service, args.limit, args.json, region=args.region, gpu=args.gpu)
    if args.command == "watch":
        from agent.cli.watch import cmd_watch
        return cmd_watch(url, args.service, args.json)
    from agent.cli.call import cmd_call
    return cmd_call(url, args.service, args.path, data=args.data, headers=args.header,
                    method=args.method)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in admission.COMMANDS:
        return admission.run(args)
    if args.command in token.COMMANDS:
        return token.run(args)
    if args.command == "join":
        return join.run(args)
    if args.command in ("run", "check-config"):
        return _run_or_check(args.command, args.config or default_path())
    if args.command in ("status", "lookup", "watch", "call"):
        return _query(args)
    if args.command == "demo":
        if not 1 <= args.workers <= 50:
            print("rma-agent demo: --workers must be between 1 and 50", file=sys.stderr)
            return 2
        from agent.cli.demo import main as demo_main
        return demo_main(args.workers)
    return 2  # pragma: no cover - argparse rejects unknown commands
