"""``rma-agent watch SERVICE``: a service's membership changes as they happen.

Why plain ``urllib`` here too (as ``agent.cli.common``): one connection, read line
by line; the SSE format is simple enough that a parser is a dozen lines. ``watch``
reconnects with ``Last-Event-ID`` when the stream breaks (the agent restarted, the
watcher was dropped as a slow reader), so the printed history has no gap it does not
mention.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from agent.cli.common import ClientError, cli_service, fail, get_json, num

RECONNECT_S = 2.0
GIVE_UP_S = 60.0
READ_TIMEOUT_S = 60.0      # the agent sends a heartbeat every 15 s


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[str, str, str]]:
    """(id, event, data) per SSE event from raw lines; comments and retry: skipped."""
    eid, event, data = "", "message", []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield eid, event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            eid = value
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)


def _worker_line(w: dict[str, Any]) -> str:
    return (f"{w.get('name', '?')} ({str(w.get('id', ''))[:12]}) {w.get('endpoint', '')} "
            f"load {num(w.get('load'))}/{num(w.get('capacity'))} {w.get('gpu') or 'no GPU'} "
            f"{w.get('region') or '-'}")


def format_event(event: str, data: dict[str, Any]) -> list[str]:
    stamp = time.strftime("%H:%M:%S")
    if event == "snapshot":
        workers = data.get("workers") or []
        out = [f"{stamp} {data.get('service')}: {len(workers)} member"
               f"{'s' if len(workers) != 1 else ''} (source: {data.get('source') or '-'})"]
        out += [f"{stamp}   = {_worker_line(w)}" for w in workers]
        return out
    w = data.get("worker") or {}
    if event == "added":
        return [f"{stamp} + added   {_worker_line(w)}"]
    if event == "changed":
        return [f"{stamp} ~ changed {_worker_line(w)} [{', '.join(data.get('fields') or [])}]"]
    if event == "removed":
        return [f"{stamp} - removed {w.get('name', '?')} ({str(w.get('id', ''))[:12]}): "
                f"{data.get('reason', '')}"]
    return [f"{stamp} {event} {json.dumps(data)}"]


def cmd_watch(url: str, service: str, as_json: bool = False, out: TextIO | None = None,
              err: TextIO | None = None, max_events: int | None = None) -> int:
    """``rma-agent watch SERVICE``: print membership changes until Ctrl-C."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = cli_service("watch", service, err)
    if name is None:
        return 2
    service = name
    target = f"{url.rstrip('/')}/api/services/{urllib.parse.quote(service, safe='')}/watch"
    last_id = ""
    seen = 0
    lost_at: float | None = None
    connected_once = False
    try:
        while True:
            headers = {"Accept": "text/event-stream", "User-Agent": "rma-agent-cli"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            req = urllib.request.Request(target, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=READ_TIMEOUT_S) as resp:
                    if lost_at is not None:
                        print(f"{time.strftime('%H:%M:%S')} (reconnected)", file=err)
                    lost_at = None
                    connected_once = True
                    for eid, event, data in sse_events(iter(resp.readline, b"")):
                        last_id = eid or last_id
                        try:
                            payload = json.loads(data)
                        except ValueError:
                            continue
                        if as_json:
                            print(json.dumps({"id": eid, "event": event, **payload}), file=out)
                        else:
                            for line in format_event(event, payload):
                                print(line, file=out)
                        out.flush()
                        seen += 1
                        if max_events is not None and seen >= max_events:
                            return 0
            except urllib.error.HTTPError as exc:
                try:
                    msg = json.loads(exc.read()).get("error") or exc.reason
                except (ValueError, AttributeError):
                    msg = exc.reason
                if exc.code == 503 and connected_once:
                    pass                       # busy: retry like a broken stream
                else:
                    return fail("watch", ClientError(f"{msg} (HTTP {exc.code})",
                                                      2 if 400 <= exc.code < 500 else 1), err)
            except (urllib.error.URLError, OSError) as exc:
                if not connected_once:
                    try:
                        get_json(url.rstrip("/") + "/healthz", timeout=3.0)
                    except ClientError as cexc:
                        return fail("watch", cexc, err)
                    return fail("watch", ClientError(f"cannot watch {target}: {exc}"), err)
            now = time.monotonic()
            if lost_at is None:
                lost_at = now
                print(f"{time.strftime('%H:%M:%S')} (stream lost, reconnecting)", file=err)
            elif now - lost_at > GIVE_UP_S:
                return fail("watch", ClientError(f"lost the agent at {url} for "
                                                  f"{GIVE_UP_S:.0f} s"), err)
            time.sleep(RECONNECT_S)
    except KeyboardInterrupt:
        return 0
