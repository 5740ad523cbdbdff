"""``rma-agent token create|list|revoke`` (SPEC §3): enrollment tokens on a coordinator.

The commands edit ``state_dir/enroll-tokens.json`` directly, under the same file lock the
running daemon takes for each enrollment (``agent.admission.tokens``), so they work with
the daemon running or stopped and never lose a use it counted. The token itself is
printed once, on stdout (and only it, so ``T=$(rma-agent token create ...)`` works); the
store keeps its SHA-256. Run them as root or as the service user (the state dir is the
service user's).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from agent.admission.keys import AdmissionError
from agent.admission.tokens import TokenStore, parse_duration
from agent.cli.common import load_config_or_report

COMMANDS = ("token",)


def add_parsers(sub: argparse._SubParsersAction,
                config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``token`` and its actions."""
    tp = sub.add_parser("token", help="enrollment tokens (on a coordinator)")
    t_sub = tp.add_subparsers(dest="token_command", metavar="ACTION")
    t_sub.required = True
    sp = t_sub.add_parser("create", help="make a token; prints it once")
    config_arg(sp)
    sp.add_argument("--services", default="*",
                    help="comma-separated services it enrolls for (default: every service "
                         "the coordinator's issuer certificate allows)")
    sp.add_argument("--uses", default="1", metavar="N", help="enrollments it allows (default 1)")
    sp.add_argument("--expires", default="7d", metavar="DURATION",
                    help="lifetime: 7d, 12h, 30m (default 7d)")
    sp.add_argument("--name", default="", metavar="N",
                    help="what 'token list' and the journal call it (default token-N)")
    sp = t_sub.add_parser("list", help="tokens with their uses left, expiry and state")
    config_arg(sp)
    sp.add_argument("--json", action="store_true", help="print raw JSON")
    sp = t_sub.add_parser("revoke", help="stop a token from enrolling anyone else")
    config_arg(sp)
    sp.add_argument("name")


def run(args: argparse.Namespace) -> int:
    """Run ``token ACTION``; exit code (2: bad usage, config or state dir)."""
    from agent.config import default_path

    prog = f"rma-agent token {args.token_command}"
    cfg = load_config_or_report(args.config or default_path())
    if cfg is None:
        return 2
    if cfg.agent.role != "coordinator":
        print(f"{prog}: tokens are made on a coordinator (agent.role is "
              f"{cfg.agent.role!r} in {cfg.source})", file=sys.stderr)
        return 2
    store = TokenStore(cfg.agent.state_dir)
    try:
        if args.token_command == "create":
            return _create(store, args, bool(cfg.network.issuer_cert), prog)
        if args.token_command == "list":
            return _list(store, args.json)
        tok = store.revoke(args.name)
        print(f"revoked token {tok.name} ({tok.used} of {tok.uses} uses made)", file=sys.stderr)
        return 0
    except AdmissionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"{prog}: {exc.filename or store.path}: permission denied (run as root or as the "
              "service user, e.g. 'sudo rma-agent token ...')", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: {exc.filename or store.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _create(store: TokenStore, args: argparse.Namespace, has_issuer: bool, prog: str) -> int:
    try:
        uses = int(args.uses)
    except ValueError:
        print(f"{prog}: --uses must be a whole number, got {args.uses!r}", file=sys.stderr)
        return 2
    secret, tok = store.create(name=args.name, services=args.services, uses=uses,
                               expires_s=parse_duration(args.expires))
    print(secret)
    print(f"token {tok.name}: {tok.uses} use(s) for {','.join(tok.services)}, expires "
          f"{_utc(tok.expires)}. It is shown only this once; on a new box: "
          f"rma-agent join https://THIS-COORDINATOR --token {secret[:9]}...", file=sys.stderr)
    if not has_issuer:
        print(f"{prog}: warning: network.issuer_cert is not set: this coordinator cannot "
              "enroll anyone until it is (rma-agent admit --issuer)", file=sys.stderr)
    return 0


def _list(store: TokenStore, as_json: bool) -> int:
    now = time.time()
    tokens = store.list()
    if as_json:
        import json
        print(json.dumps([{"name": t.name, "services": list(t.services), "uses": t.uses,
                           "used": t.used, "uses_left": max(0, t.uses - t.used),
                           "created": t.created, "expires": t.expires,
                           "revoked": t.revoked, "state": t.state(now)} for t in tokens],
                         indent=2))
        return 0
    if not tokens:
        print("no tokens (make one with 'rma-agent token create')")
        return 0
    rows = [("NAME", "SERVICES", "USES LEFT", "EXPIRES", "STATE")]
    rows += [(t.name, ",".join(t.services), f"{max(0, t.uses - t.used)}/{t.uses}",
              _utc(t.expires), t.state(now)) for t in tokens]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))

