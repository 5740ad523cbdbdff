"""``rma-agent`` command line (SPEC §3). Exit codes: 0 ok, 1 runtime failure, 2 bad usage/config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, default_path, load_config, summary


def _default_url() -> str:
    """The local agent's HTTP address, read from the default config when possible."""
    try:
        cfg = load_config(default_path())
    except (ConfigError, OSError):
        return "http://127.0.0.1:8080"
    host = cfg.http.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.http.listen.port}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rma-agent", description=(
        "Peer-to-peer discovery agent of the RMA platform (worker or coordinator role)."))
    p.add_argument("--version", action="version", version=f"rma-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def config_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=None, metavar="PATH",
                        help="config file (default $RMA_AGENT_CONFIG or /etc/rma-agent/agent.toml)")

    config_arg(sub.add_parser("run", help="run the daemon"))
    config_arg(sub.add_parser("check-config", help="validate the config and exit"))
    sp = sub.add_parser("status", help="the local agent's state")
    sp.add_argument("--url", default=None, help="agent HTTP URL (default: from the config)")
    sp.add_argument("--json", action="store_true", help="print raw JSON")
    sp = sub.add_parser("lookup", help="ranked workers for a service")
    sp.add_argument("service")
    sp.add_argument("--url", default=None, help="agent HTTP URL (default: from the config)")
    sp.add_argument("--limit", type=int, default=10, metavar="N")
    sp.add_argument("--region", default=None)
    sp.add_argument("--gpu", default=None)
    sp.add_argument("--json", action="store_true", help="print raw JSON")
    sp.add_argument("--explain", action="store_true",
                    help="score components of each worker and why others were left out")
    sp = sub.add_parser("watch", help="print a service's membership changes as they happen")
    sp.add_argument("service")
    sp.add_argument("--url", default=None, help="agent HTTP URL (default: from the config)")
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
    sp.add_argument("--url", default=None, help="agent HTTP URL (default: from the config)")
    sp = sub.add_parser("demo", help="a local cluster on loopback; Ctrl-C stops it")
    sp.add_argument("--workers", type=int, default=5, metavar="N")
    from agent import cli_admission
    cli_admission.add_parsers(sub, config_arg)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent import cli_admission
    if args.command in cli_admission.COMMANDS:
        return cli_admission.run(args)
    if args.command in ("run", "check-config"):
        path = args.config or default_path()
        if args.command == "run":
            from agent.run import main as run_main
            return run_main(path)
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 2
        errors, warnings = cli_admission.check_config_admission(cfg, path)
        for line in errors + warnings:
            print(line, file=sys.stderr)
        if errors:
            return 2
        print(f"{path}: {summary(cfg)}")
        return 0
    if args.command == "status":
        from agent.discovery.client import cmd_status
        return cmd_status(args.url or _default_url(), args.json)
    if args.command == "lookup":
        if args.limit < 1:
            print("rma-agent lookup: --limit must be at least 1", file=sys.stderr)
            return 2
        if args.explain:
            from agent.dashboard.cli import cmd_lookup_explain
            return cmd_lookup_explain(args.url or _default_url(), args.service, args.limit,
                                      args.json, region=args.region, gpu=args.gpu)
        from agent.discovery.client import cmd_lookup
        return cmd_lookup(args.url or _default_url(), args.service, args.limit, args.json,
                          region=args.region, gpu=args.gpu)
    if args.command == "watch":
        from agent.dashboard.cli import cmd_watch
        return cmd_watch(args.url or _default_url(), args.service, args.json)
    if args.command == "call":
        from agent.router.client import cmd_call
        return cmd_call(args.url or _default_url(), args.service, args.path, data=args.data,
                        headers=args.header, method=args.method)
    if args.command == "demo":
        if not 1 <= args.workers <= 50:
            print("rma-agent demo: --workers must be between 1 and 50", file=sys.stderr)
            return 2
        from agent.demo import main as demo_main
        return demo_main(args.workers)
    return 2  # pragma: no cover - argparse rejects unknown commands
