"""A Server-Sent Events reader for tests: one stream read in a thread (stdlib only)."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from typing import Any


class SSEReader:
    """Reads one SSE stream in a thread: (id, event, data) tuples into a queue."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None
                 ) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        if self.status == 200:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        eid, event, data = "", "", ""
        try:
            for raw in iter(self.resp.readline, b""):
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    eid = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    self.events.put((eid, event, json.loads(data)))
                    data = ""
        except (OSError, ValueError, AttributeError):
            pass            # closed under us by close() (http.client is not thread-safe)

    def next(self, timeout: float = 15.0) -> tuple[str, str, Any]:
        return self.events.get(timeout=timeout)

    def until(self, pred: Any, timeout: float, what: str) -> list[tuple[str, str, Any]]:
        """Events up to and including the first matching ``pred``."""
        got: list[tuple[str, str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.next(max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            got.append(ev)
            if pred(ev):
                return got
        raise AssertionError(f"no {what} within {timeout:.0f}s; got {got}")

    def close(self) -> None:
        try:
            self.conn.sock and self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
