"""``rma-agent identity``, ``network-key create``, ``admit`` and ``revoke`` (SPEC §3).

Closed-network workflow (docs/SECURITY.md):

1. the operator, once: ``rma-agent network-key create -o netkey.pem`` (kept offline) and
   puts the printed public key in every agent's ``network.admission_keys``;
2. on each worker: ``rma-agent identity`` prints the box's public key;
3. the operator: ``rma-agent admit --network-key netkey.pem --public-key B64 --name N
   --services ocr -o box.cert``; the worker sets ``worker.admission_cert`` to that file;
4. to withdraw admission: ``rma-agent revoke --network-key netkey.pem --public-key B64
   [--list revocations.list] -o revocations.list`` and copy the list to the coordinators'
   ``state_dir/revocations.list``; every agent fetches it from them within a minute.

Every bad input exits 2 with one line naming what is wrong; nothing is ever overwritten
except a revocation list being extended in place (``--list F -o F``).
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.admission.certificate import MAX_CERT_DAYS, Certificate, parse_services
from agent.admission.keys import (
    AdmissionError,
    NetworkKey,
    b64_key,
    parse_public_key,
    read_b64_file,
    write_new_file,
)
from agent.admission.revocation import RevocationList
from agent.cli.common import load_config_or_report

if TYPE_CHECKING:
    from agent.config import Config

COMMANDS = ("identity", "network-key", "admit", "revoke")


class _Usage(Exception):
    """Bad input: printed as one line, exit 2."""


def add_parsers(sub: argparse._SubParsersAction, config_arg: Callable[[argparse.ArgumentParser], None]
                ) -> None:
    """Add this module's subcommands to the main parser."""
    config_arg(sub.add_parser("identity", help="this box's node id and public key"))
    nk = sub.add_parser("network-key", help="network admission keys (closed networks)")
    nk_sub = nk.add_subparsers(dest="nk_command", metavar="ACTION")
    nk_sub.required = True
    sp = nk_sub.add_parser("create", help="make a network admission key; prints its public half")
    sp.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    sp = sub.add_parser("admit", help="sign a worker's admission certificate (or, with "
                        "--issuer, a coordinator's issuer certificate)")
    sp.add_argument("--network-key", required=True, type=Path, metavar="FILE")
    sp.add_argument("--public-key", required=True, metavar="B64",
                    help="the worker's key, from 'rma-agent identity' on that box")
    sp.add_argument("--name", default="", help="who this is (shown in logs), max 64 bytes")
    sp.add_argument("--services", default="*",
                    help="comma-separated services it may announce (default: every service)")
    sp.add_argument("--days", default=None,
                    help="validity in days (default 30; 365 with --issuer)")
    sp.add_argument("--issuer", action="store_true",
                    help="an issuer certificate for a coordinator's own key: it may then "
                         "enroll and renew workers within these limits")
    sp.add_argument("--max-cert-days", default=None, metavar="DAYS",
                    help="with --issuer: the longest certificate it may issue (default 7)")
    sp.add_argument("-o", "--output", required=True, type=Path, metavar="CERT")
    sp = sub.add_parser("revoke", help="add workers to a signed revocation list")
    sp.add_argument("--network-key", required=True, type=Path, metavar="FILE")
    sp.add_argument("--public-key", action="append", default=[], metavar="B64",
                    help="a worker key to revoke (repeatable)")
    sp.add_argument("--unrevoke", action="append", default=[], metavar="B64",
                    help="take a key off the list given with --list (repeatable)")
    sp.add_argument("--list", type=Path, default=None, metavar="FILE",
                    help="the current list to extend (may equal -o)")
    sp.add_argument("-o", "--output", required=True, type=Path, metavar="LIST")


def run(args: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``; exit code."""
    prog = f"rma-agent {args.command}" + (f" {args.nk_command}" if args.command == "network-key"
                                          else "")
    try:
        if args.command == "identity":
            return _identity(args.config)
        if args.command == "network-key":
            return _network_key_create(args.output)
        if args.command == "admit":
            return _admit(args)
        if args.command == "revoke":
            return _revoke(args)
    except (_Usage, AdmissionError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


def _check_output(path: Path, *, may_replace: Path | None = None) -> None:
    if may_replace is not None and path.resolve() == may_replace.resolve():
        return
    if path.exists() or path.is_symlink():
        raise _Usage(f"{path}: already exists (refusing to overwrite)")
    if not path.parent.is_dir():
        raise _Usage(f"{path.parent}: no such directory")


# ----------------------------------------------------------------------------- identity
def _identity(config: Path | None) -> int:
    """Print this box's node id and public key; create the identity at first call (as
    ``run`` would at first start) so an operator can have a box admitted before starting
    it. Run as root, a key created in a state dir owned by the service user is handed to
    that user, so the service can still read it."""
    from agent.config import default_path
    from agent.dht.identity import KEY_FILE, Identity, IdentityError

    cfg = load_config_or_report(config or default_path())
    if cfg is None:
        return 2
    state = Path(cfg.agent.state_dir)
    key = state / KEY_FILE
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    created = False
    try:
        if key.exists():
            ident = Identity._load(key)
        else:
            ident = Identity.load_or_create(state)
            created = True
            if root:
                st = state.stat()
                if st.st_uid != 0:
                    os.chown(key, st.st_uid, st.st_gid)
    except PermissionError as exc:
        raise _Usage(f"{exc.filename or key}: permission denied (run as root or as the "
                     "service user, e.g. 'sudo rma-agent identity')") from None
    except IdentityError as exc:
        msg = str(exc)
        if "Permission denied" in msg:
            msg += " (run as root or as the service user, e.g. 'sudo rma-agent identity')"
        raise _Usage(msg) from None
    except OSError as exc:
        raise _Usage(f"{key}: {exc.strerror or exc}") from None
    if created:
        print(f"created a new identity in {key}", file=sys.stderr)
    print(f"node_id: {ident.node_id.hex()}")
    print(f"public_key: {b64_key(ident.public_key)}")
    return 0


# ----------------------------------------------------------------------------- keys, certs
def _network_key_create(output: Path) -> int:
    _check_output(output)
    key = NetworkKey.generate()
    try:
        key.save_new(output)
    except OSError as exc:
        raise _Usage(f"{output}: {exc.strerror or exc}") from None
    print(b64_key(key.public_key))
    print(f"wrote the network admission key to {output} (mode 0600; keep it offline). "
          "Put the public key above in every agent's network.admission_keys.",
          file=sys.stderr)
    return 0


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise _Usage(f"--days must be a number, got {text!r}") from None
    if not math.isfinite(days) or days <= 0 or days > MAX_CERT_DAYS:
        raise _Usage(f"--days must be more than 0 and at most {MAX_CERT_DAYS}, got {text}")
    return days


def _admit(args: argparse.Namespace) -> int:
    if args.issuer:
        return _admit_issuer(args)
    if args.max_cert_days is not None:
        raise _Usage("--max-cert-days only goes with --issuer")
    days = _days(args.days or "30")
    subject = parse_public_key(args.public_key, "--public-key")
    services = parse_services(args.services)
    name = args.name
    if len(name.encode("utf-8", "surrogatepass")) > 64 or not name.isprintable():
        raise _Usage("--name must be printable text of at most 64 bytes")
    _check_output(args.output)
    key = NetworkKey.load(args.network_key)
    cert = Certificate.issue(key, subject, name=name, services=services, days=days)
    data = cert.encode()
    try:
        write_new_file(args.output, base64.b64encode(data) + b"\n", mode=0o644)
    except OSError as exc:
        raise _Usage(f"{args.output}: {exc.strerror or exc}") from None
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cert.not_after))
    print(f"admitted {args.public_key.strip()}{f' ({name})' if name else ''} for "
          f"{','.join(services)} until {until}: {args.output} ({len(data)} bytes). "
          f"Set worker.admission_cert to this file on that box.", file=sys.stderr)
    return 0


def _admit_issuer(args: argparse.Namespace) -> int:
    """``admit --issuer``: the admission key certifies a coordinator's identity key as an
    issuer (docs/SECURITY.md "Issuers and enrollment")."""
    from agent.admission.issuer import MAX_ISSUED_S, MAX_ISSUER_NAME, IssuerCertificate

    days = _days(args.days or "365")
    try:
        max_days = float(args.max_cert_days or "7")
    except ValueError:
        raise _Usage(f"--max-cert-days must be a number, got {args.max_cert_days!r}") from None
    if not math.isfinite(max_days) or not 0 < max_days * 86400 <= MAX_ISSUED_S:
        raise _Usage(f"--max-cert-days must be more than 0 and at most "
                     f"{MAX_ISSUED_S // 86400}, got {args.max_cert_days}")
    if max_days > days:
        raise _Usage(f"--max-cert-days ({max_days:g}) is longer than the issuer certificate "
                     f"itself (--days {days:g})")
    subject = parse_public_key(args.public_key, "--public-key")
    services = parse_services(args.services)
    name = args.name
    if len(name.encode("utf-8", "surrogatepass")) > MAX_ISSUER_NAME or not name.isprintable():
        raise _Usage(f"--name must be printable text of at most {MAX_ISSUER_NAME} bytes with "
                     "--issuer")
    _check_output(args.output)
    key = NetworkKey.load(args.network_key)
    cert = IssuerCertificate.issue(key, subject, name=name, services=services, days=days,
                                   max_cert_days=max_days)
    try:
        write_new_file(args.output, base64.b64encode(cert.encode()) + b"\n", mode=0o644)
    except OSError as exc:
        raise _Usage(f"{args.output}: {exc.strerror or exc}") from None
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cert.not_after))
    print(f"issuer {args.public_key.strip()}{f' ({name})' if name else ''} may admit workers "
          f"for {','.join(services)}, each for at most {max_days:g} days, until {until}: "
          f"{args.output}. On that coordinator set network.issuer_cert to this file.",
          file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    keys = [parse_public_key(k, "--public-key") for k in args.public_key]
    restore = {parse_public_key(k, "--unrevoke") for k in args.unrevoke}
    if not keys and not restore:
        raise _Usage("give at least one --public-key to revoke (or --unrevoke with --list)")
    if restore and args.list is None:
        raise _Usage("--unrevoke needs the current list (--list FILE)")
    _check_output(args.output, may_replace=args.list)
    key = NetworkKey.load(args.network_key)
    previous = None
    if args.list is not None:
        try:
            previous = RevocationList.decode(read_b64_file(args.list, "revocation list",
                                                           64 + 35 * 20_000))
        except AdmissionError as exc:
            msg = str(exc)
            raise _Usage(msg if msg.startswith(str(args.list)) else f"{args.list}: {msg}") from None
    if restore:
        assert previous is not None
        missing = restore - set(previous.revoked)
        if missing:
            raise _Usage(f"--unrevoke {b64_key(sorted(missing)[0])}: not on {args.list}")
    rl = RevocationList.issue(key, keys, previous=previous, remove=restore)
    data = base64.b64encode(rl.encode()) + b"\n"
    replace = args.list is not None and args.output.resolve() == args.list.resolve()
    try:
        write_new_file(args.output, data, mode=0o644, replace=replace)
    except OSError as exc:
        raise _Usage(f"{args.output}: {exc.strerror or exc}") from None
    added = len(set(rl.revoked) - set(previous.revoked if previous else ()))
    print(f"{args.output}: {len(rl.revoked)} revoked key(s) ({added} new, {len(restore)} "
          f"taken off), seq {rl.seq}. "
          "Copy it to each coordinator's state_dir as revocations.list.", file=sys.stderr)
    return 0


def check_config_admission(cfg: Config, path: Path) -> tuple[list[str], list[str]]:
    """``check-config``'s semantic checks of ``worker.admission_cert`` (the loader checks
    syntax only): (error lines, warning lines), as ``PATH:LINE: worker.admission_cert:
    ...``. The box's public key is read from ``state_dir`` when this user may read it
    (never created here); otherwise "for another key" cannot be checked and is skipped."""
    from agent.admission.settings import (
        NO_SOURCES,
        certificate_state,
        configured_keys,
        revocation_sources,
    )
    from agent.config.locator import _Locator
    from agent.dht.identity import KEY_FILE, Identity, IdentityError

    pk: bytes | None = None
    try:
        pk = Identity._load(Path(cfg.agent.state_dir) / KEY_FILE).public_key
    except (IdentityError, OSError, ValueError):
        pk = None
    _, errors, warnings = certificate_state(cfg, pk)
    try:
        line = _Locator(Path(path).read_text("utf-8")).line(("worker", "admission_cert"),
                                                            ("network", "admission_keys"))
    except (OSError, UnicodeDecodeError):
        line = 1
    where = f"{path}:{line}: worker.admission_cert"
    out_errors = [f"{where}: {e}" for e in errors]
    out_warnings = [f"{where}: warning: {w}" for w in warnings]
    out_errors += issuer_lines(cfg, path, pk, errors=True)
    out_warnings += issuer_lines(cfg, path, pk, errors=False)
    if configured_keys(cfg) and not revocation_sources(cfg) and cfg.agent.role == "worker":
        try:
            nline = _Locator(Path(path).read_text("utf-8")).line(("network", "admission_keys"))
        except (OSError, UnicodeDecodeError):
            nline = 1
        out_warnings.append(f"{path}:{nline}: network.admission_keys: warning: {NO_SOURCES}")
    return out_errors, out_warnings


def issuer_lines(cfg: Config, path: Path, pk: bytes | None, *, errors: bool) -> list[str]:
    """``check-config``'s lines about ``network.issuer_cert`` (errors or warnings), as
    ``PATH:LINE: network.issuer_cert: ...``."""
    from agent.admission.settings import issuer_state
    from agent.config.locator import _Locator

    errs, warns = issuer_state(cfg, pk)
    lines = errs if errors else warns
    if not lines:
        return []
    try:
        line = _Locator(Path(path).read_text("utf-8")).line(("network", "issuer_cert"))
    except (OSError, UnicodeDecodeError):
        line = 1
    tag = "" if errors else "warning: "
    return [f"{path}:{line}: network.issuer_cert: {tag}{m}" for m in lines]
