"""Logging for a daemon that usually runs under systemd.

Why two formats: journald adds its own timestamp and reads a ``<N>`` syslog priority
prefix from each stderr line (sd-daemon(3)), so under journald we print ``<N>message``;
on a terminal or in a file we print plain timestamped lines. We detect journald the way
systemd documents it: ``$JOURNAL_STREAM`` is ``dev:ino`` of the stream stderr is
connected to.

Library noise (kademlia logs every lookup at INFO, rpcudp every missed reply at ERROR)
is capped at WARNING, and our own per-peer lines go through ``agent.ratelimit.RateLimiter``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

# syslog priorities (sd-daemon.h): 3 err, 4 warning, 5 notice, 6 info, 7 debug
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}

NOISY_LIBRARIES = ("kademlia", "rpcudp", "aiohttp.access")


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when ``$JOURNAL_STREAM`` names the device and inode of our stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    stream = stream or sys.stderr
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` — journald turns ``<N>`` into the PRIORITY field."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        # one event = one journal entry: continuation lines are indented, same priority
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure the root logger once (idempotent: replaces our previous handler)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.set_name("rma-agent")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "rma-agent":
            root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Apply ``log.level``; libraries never go below WARNING unless we debug."""
    lvl = LEVELS.get(level, logging.INFO)
    logging.getLogger().setLevel(lvl)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING) if lvl > logging.DEBUG
                                         else logging.INFO)
    # rpcudp logs every timeout at ERROR: it is a normal event in a P2P network
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
