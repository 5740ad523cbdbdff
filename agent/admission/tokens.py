"""Enrollment tokens: what lets a new box get a certificate from a coordinator.

``rma-agent token create`` makes a token — ``rmat_`` + 43 characters of URL-safe base64
(32 random bytes: guessing is hopeless, the rate limit keeps it cheap to refuse) — and
prints it once. The coordinator keeps only its SHA-256, in ``state_dir/enroll-tokens.json``
(mode 0600, JSON)::

    {"version": 1,
     "tokens": {"batch-3": {"digest": HEX, "services": ["ocr"], "uses": 50, "used": 3,
                            "created": T, "expires": T, "revoked": null | T}},
     "recent": {HEX(SHA-256(request signature)): [token name, forget after T]}}

**One writer at a time, durably.** Both the daemon (each enrollment) and the command line
(create, revoke) change the file, so every change is a read-modify-write under an
exclusive ``fcntl.flock`` on ``state_dir/enroll-tokens.lock``, written atomically (temp
file + fsync + rename, ``agent.fsutil``). A use is counted *before* the certificate is
signed and sent: a crash in between loses that use, it never grants an extra one; a
restart reads the counts back. Inside the daemon an ``asyncio.Lock`` queues enrollments
so at most one thread waits on the file lock.

**Replays.** ``recent`` remembers, for ``2 * MAX_SKEW``, the signature of every request
that used a token: the same request again (a client retrying after a lost answer, or
someone replaying a captured one) is answered without using the token again. Older
requests are refused by their ``time`` anyway (``agent.admission.enrollment``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.admission.certificate import parse_services
from agent.admission.enrollment import MAX_SKEW, token_digest
from agent.admission.keys import AdmissionError
from agent.dht.record import ALL_SERVICES
from agent.fsutil import write_atomic

STORE_FILE = "enroll-tokens.json"
LOCK_FILE = "enroll-tokens.lock"
TOKEN_PREFIX = "rmat_"
MAX_TOKENS = 1000
MAX_RECENT = 20000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_EXPIRES = 365 * 86400


class TokenError(AdmissionError):
    """A token command's argument or the store is unusable (one line for the operator)."""


def parse_duration(text: str) -> int:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` (a bare number is days) -> seconds."""
    m = _DURATION_RE.fullmatch(text.strip().lower())
    if m is None:
        raise TokenError(f"--expires must look like 7d, 12h, 30m or 90s, got {text!r}")
    secs = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not 60 <= secs <= MAX_EXPIRES:
        raise TokenError(f"--expires must be between 1 minute and 365 days, got {text!r}")
    return secs


def new_token() -> str:
    """A fresh token (256 bits from the OS's CSPRNG)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


@dataclass(frozen=True)
class Token:
    """One token as stored (never the secret itself)."""

    name: str
    digest: str
    services: tuple[str, ...]
    uses: int
    used: int
    created: int
    expires: int
    revoked: int | None

    def state(self, now: float) -> str:
        """``active``, ``revoked``, ``expired`` or ``used up``."""
        if self.revoked is not None:
            return "revoked"
        if now >= self.expires:
            return "expired"
        if self.used >= self.uses:
            return "used up"
        return "active"

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "services": list(self.services), "uses": self.uses,
                "used": self.used, "created": self.created, "expires": self.expires,
                "revoked": self.revoked}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> Token:
        return cls(name, str(d["digest"]), tuple(d["services"]), int(d["uses"]), int(d["used"]),
                   int(d["created"]), int(d["expires"]),
                   None if d.get("revoked") is None else int(d["revoked"]))

    def allows(self, services: tuple[str, ...]) -> bool:
        return ALL_SERVICES in self.services or set(services) <= set(self.services)


@dataclass(frozen=True)
class Outcome:
    """What ``TokenStore.use`` decided: ``result`` is ``ok``, ``replay`` (the same
    request again: answered, no use counted), ``unknown``, ``revoked``, ``expired``,
    ``used up`` or ``services`` (the token does not allow what was asked)."""

    result: str
    token: Token | None = None
    services: tuple[str, ...] = ()      # what the certificate names (ok, replay)


class TokenStore:
    """The token file of one ``state_dir``; every method takes the file lock."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STORE_FILE
        self.lock_path = self.dir / LOCK_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The file's content under an exclusive lock; written back (atomically, 0600)
        when the body changed it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            self._own(self.lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            before = json.dumps(data, sort_keys=True)
            yield data
            after = json.dumps(data, sort_keys=True)
            if after != before:
                write_atomic(self.path, after.encode() + b"\n", mode=0o600)
                self._own(self.path)
        finally:
            os.close(fd)          # releases the lock

    def _own(self, path: Path) -> None:
        """Run as root (``sudo rma-agent token create``), hand what we wrote to the
        state dir's owner — the service user — or the daemon could not count uses."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return
        st = self.dir.stat()
        if st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"version": 1, "tokens": {}, "recent": {}}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != 1 \
                    or not isinstance(data.get("tokens"), dict):
                raise ValueError("not a token store")
            for name, d in data["tokens"].items():
                Token.from_json(name, d)
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"{self.path}: unreadable token store ({exc})") from None
        if not isinstance(data.get("recent"), dict):
            data["recent"] = {}
        return data

    def create(self, *, name: str = "", services: str = "*", uses: int = 1,
               expires_s: int = 7 * 86400, now: float | None = None) -> tuple[str, Token]:
        """A new token: (the secret, printed once and never stored; its stored record)."""
        now = time.time() if now is None else now
        svcs = parse_services(services)
        if not 1 <= uses <= 1_000_000:
            raise TokenError(f"--uses must be between 1 and 1000000, got {uses}")
        if name and not NAME_RE.fullmatch(name):
            raise TokenError("--name must be 1-32 characters of A-Z a-z 0-9 . _ -, "
                             f"starting with a letter or digit, got {name!r}")
        secret = new_token()
        with self._locked() as data:
            tokens = data["tokens"]
            if len(tokens) >= MAX_TOKENS:
                raise TokenError(f"{self.path}: already {MAX_TOKENS} tokens; revoke old ones "
                                 "('rma-agent token list')")
            if not name:
                name = next(f"token-{i}" for i in range(1, MAX_TOKENS + 2)
                            if f"token-{i}" not in tokens)
            if name in tokens:
                raise TokenError(f"a token named {name!r} already exists")
            tok = Token(name, token_digest(secret).hex(), svcs, uses, 0, int(now),
                        int(now + expires_s), None)
            tokens[name] = tok.to_json()
        return secret, tok

    def list(self) -> list[Token]:
        with self._locked() as data:
            return [Token.from_json(n, d) for n, d in sorted(data["tokens"].items())]

    def revoke(self, name: str, now: float | None = None) -> Token:
        now = time.time() if now is None else now
        with self._locked() as data:
            d = data["tokens"].get(name)
            if d is None:
                raise TokenError(f"no token named {name!r} ('rma-agent token list' shows them)")
            if d.get("revoked") is None:
                d["revoked"] = int(now)
            return Token.from_json(name, d)

    def use(self, token: str, services: tuple[str, ...], request_id: bytes,
            now: float | None = None,
            resolve: Callable[[Token], tuple[str, ...] | None] | None = None) -> Outcome:
        """Count one use of ``token`` for the request ``request_id`` (its signature; a
        repeat of a request already counted is a ``replay``). ``resolve`` says what the
        certificate would name for this token (None: nothing it may grant, no use
        counted); by default ``services``, or the token's when ``services`` is ()."""
        now = time.time() if now is None else now
        digest = token_digest(token).hex()
        rid = hashlib.sha256(request_id).hexdigest()
        with self._locked() as data:
            recent = data["recent"]
            for k in [k for k, v in recent.items() if v[1] <= now]:
                del recent[k]
            match = next(((n, d) for n, d in data["tokens"].items()
                          if secrets.compare_digest(d["digest"], digest)), None)
            if match is None:
                return Outcome("unknown")
            tok = Token.from_json(*match)
            replay = rid in recent and recent[rid][0] == tok.name
            state = tok.state(now)
            if state != "active" and not (replay and state == "used up"):
                return Outcome(state, tok)
            grant = (resolve(tok) if resolve is not None
                     else (services or tok.services) if tok.allows(services) else None)
            if not grant:
                return Outcome("services", tok)
            if replay:
                return Outcome("replay", tok, grant)
            if len(recent) >= MAX_RECENT:
                recent.pop(min(recent, key=lambda k: recent[k][1]))
            match[1]["used"] = tok.used + 1
            recent[rid] = [tok.name, now + 2 * MAX_SKEW]
            return Outcome("ok", Token.from_json(*match), grant)
