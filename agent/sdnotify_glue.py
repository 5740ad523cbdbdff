"""sd_notify for Type=notify units, wrapped so it can never hurt the daemon.

``sdnotify.SystemdNotifier`` connects once and swallows errors silently; we want to
know once (a log line) when ``NOTIFY_SOCKET`` is set but unusable, and never fail.
The watchdog is pinged from a task *on the event loop*, so a blocked loop stops the
pings and systemd restarts us — that is the point of a watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import os

import sdnotify

log = logging.getLogger("rma_agent.systemd")


class Notifier:
    """Send sd_notify messages through ``sdnotify``; a no-op outside systemd.

    ``sdnotify.SystemdNotifier(debug=True)`` raises instead of swallowing, so we can
    log the first failure once and then stay quiet. It encodes latin-1; systemd reads
    UTF-8, so ``notify`` passes the UTF-8 bytes through that encoding unchanged.
    """

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._broken = False
        self._last_status: str | None = None
        if self.address:
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except Exception as exc:  # sdnotify re-raises anything socket/connect raised
                self._fail(exc)

    @property
    def enabled(self) -> bool:
        return self._notifier is not None and not self._broken

    def _fail(self, exc: Exception) -> None:
        if not self._broken:
            log.warning("sd_notify to %s failed (%s); continuing without systemd notifications",
                        self.address, exc)
        self._broken = True

    def notify(self, message: str) -> bool:
        if not self.enabled or self._notifier is None:
            return False
        try:
            # sdnotify latin-1-encodes the str it is given; handing it our UTF-8 bytes
            # spelled as latin-1 makes the datagram exactly those UTF-8 bytes
            self._notifier.notify(message.encode("utf-8").decode("latin-1"))
            return True
        except Exception as exc:
            self._fail(exc)
            return False

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_status = status or self._last_status

    def reloading(self) -> None:
        self.notify("RELOADING=1")

    def stopping(self, status: str = "stopping") -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        text = text.replace("\n", " ")[:400]
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, if the watchdog is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 2e6 if value > 0 else None


async def watchdog_task(notifier: Notifier, interval: float) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds from the loop itself."""
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
