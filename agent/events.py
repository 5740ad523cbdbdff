"""Server-Sent Events on the admin API: bounded channels, resumable, never unbounded.

Why a module of its own: the dashboard's ``GET /api/events`` and every
``GET /api/services/{name}/watch`` share the same problems — many long-lived
connections, readers that stop reading, clients that reconnect and want what they
missed — and must solve them the same way:

* **Bounded subscribers.** A :class:`Channel` group has a maximum number of
  subscribers (:class:`SubscriberLimit`); one more is refused before any stream starts
  (the handler answers ``503`` JSON with ``Retry-After``).
* **Bounded buffering.** Each subscriber has a queue of at most ``queue_size`` frames.
  A reader whose queue overflows is *dropped*: its connection is aborted at once (the
  frames already in the kernel's socket buffer are all it gets). Nothing is ever
  buffered without bound for a slow reader.
* **Resume.** Every published frame carries an ``id:`` (a number that grows across the
  whole process, starting from the wall clock in ms so ids after a restart are larger
  than any id before it). The channel keeps the last ``history`` frames; a client
  reconnecting with ``Last-Event-ID: N`` gets exactly the frames after ``N`` when the
  ring still covers them, otherwise the caller's "resync" frame (e.g. the current
  member list of a watched service).
* **Heartbeats.** A comment line (``: ping``) every ``heartbeat_s`` keeps proxies and
  idle-timeouts from cutting a quiet stream and lets the server notice a dead peer.

Frames are encoded once per publish (``bytes``), not once per subscriber.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

log = logging.getLogger("rma_agent.events")

HEARTBEAT_S = 15.0
QUEUE_SIZE = 256
HISTORY = 512
RETRY_MS = 2000
CHECK_S = 2.0           # how often an idle stream checks its peer is still there

_ids = itertools.count(int(time.time() * 1000))


def next_id() -> int:
    """A process-wide increasing event id (ms clock at start, then +1 per event)."""
    return next(_ids)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def frame(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE frame. ``data`` is JSON on a single line (JSON never needs a newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {_dumps(data)}\n\n".encode()


HEARTBEAT_FRAME = b": ping\n\n"


class Subscriber:
    """One open stream: a bounded queue of frames and the means to cut it off."""

    __slots__ = ("_transport", "dropped", "queue", "reason")

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queue_size)
        self.dropped = False
        self.reason = ""
        self._transport: asyncio.BaseTransport | None = None

    def offer(self, data: bytes) -> bool:
        """Queue a frame; a full queue drops the subscriber (False)."""
        if self.dropped:
            return False
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.drop("slow reader: queue full")
            return False
        return True

    def drop(self, reason: str) -> None:
        """End this stream now: abort the connection (its handler sees the error)."""
        if self.dropped:
            return
        self.dropped = True
        self.reason = reason
        transport = self._transport
        if transport is not None and not transport.is_closing():
            abort = getattr(transport, "abort", None)
            if abort is not None:
                abort()
            else:                       # pragma: no cover - every TCP transport has it
                transport.close()
        # wake the handler if it waits on an empty queue
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            pass

    def close(self) -> None:
        """A clean end (agent stopping): the handler finishes after what is queued."""
        if self.dropped:
            return
        self.dropped = True
        self.reason = "closed"
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                try:
                    self.queue.get_nowait()
                except asyncio.QueueEmpty:  # pragma: no cover - racing is impossible here
                    pass


class SubscriberLimit:
    """A shared bound on open streams (e.g. every service watch of one agent together)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.current = 0
        self.refused = 0
        self.dropped = 0

    def try_take(self) -> bool:
        if self.current >= self.maximum:
            self.refused += 1
            return False
        self.current += 1
        return True

    def release(self) -> None:
        self.current = max(0, self.current - 1)


class Channel:
    """A stream of frames with a replay ring and bounded subscribers."""

    def __init__(self, limit: SubscriberLimit, *, history: int = HISTORY,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.history: deque[tuple[int, bytes]] = deque(maxlen=history)
        self.subscribers: set[Subscriber] = set()
        self.start_id = next_id()       # ids before this are from another channel or run
        self.evicted_upto = self.start_id
        self.last_id = self.start_id
        self.published = 0

    def publish(self, event: str, data: Any, *, keep: bool = True) -> int:
        """Send ``event`` to every subscriber; ``keep`` puts it in the replay ring."""
        eid = next_id()
        self.last_id = eid
        raw = frame(event, data, eid)
        if keep:
            if len(self.history) == self.history.maxlen:
                self.evicted_upto = self.history[0][0]
            self.history.append((eid, raw))
        self.published += 1
        for sub in list(self.subscribers):
            if not sub.offer(raw):
                self.limit.dropped += 1
                self.subscribers.discard(sub)
        return eid

    def broadcast(self, raw: bytes) -> None:
        """An unnumbered frame (not replayed), e.g. the dashboard's periodic state."""
        for sub in list(self.subscribers):
            if not sub.offer(raw):
                self.limit.dropped += 1
                self.subscribers.discard(sub)

    def replay_after(self, last_id: int | None) -> list[bytes] | None:
        """The kept frames after ``last_id``; None when the ring cannot cover the gap."""
        if last_id is None or last_id < self.start_id or last_id < self.evicted_upto \
                or last_id > self.last_id:
            return None
        return [raw for eid, raw in self.history if eid > last_id]

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            sub.close()
        self.subscribers.clear()


def parse_last_event_id(request: web.Request) -> int | None:
    """``Last-Event-ID`` header (or ``?last_event_id=``, for clients that cannot set
    headers); anything that is not a plain integer means "no resume"."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 20:
        return None
    return int(raw)


def too_many(what: str, limit: SubscriberLimit) -> web.Response:
    return web.json_response(
        {"error": f"too many {what} open ({limit.maximum}); try again later"},
        status=503, headers={"Retry-After": "5"})


async def stream(request: web.Request, channel: Channel,
                 first: Callable[[], Iterable[bytes]],
                 *, before: Callable[[], Awaitable[Any]] | None = None,
                 heartbeat_s: float = HEARTBEAT_S,
                 on_close: Callable[[], None] | None = None) -> web.StreamResponse:
    """Serve ``channel`` as ``text/event-stream`` until the client goes, is dropped, or
    the channel closes. The caller already took a slot of ``channel.limit``; it is given
    back here. ``before()`` is awaited first (e.g. a watch's first lookup); then, with
    no await in between, the subscriber is registered and ``first()`` gives the frames
    to send ahead of live ones (a replay or a snapshot) — so no frame is lost or sent
    twice between the two."""
    sub = Subscriber(channel.queue_size)
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache, no-transform",
        "X-Accel-Buffering": "no",
        "X-Content-Type-Options": "nosniff",
    })
    try:
        sub._transport = request.transport
        if before is not None:
            await before()
        channel.subscribers.add(sub)
        initial = list(first())
        await resp.prepare(request)
        await resp.write(f"retry: {RETRY_MS}\n\n".encode() + b"".join(initial))
        idle = 0.0
        while not sub.dropped or not sub.queue.empty():
            # wake up now and then to notice a peer that hung up while the stream was
            # quiet (the handler is not cancelled when the client goes)
            step = min(heartbeat_s, CHECK_S)
            try:
                item = await asyncio.wait_for(sub.queue.get(), step)
                idle = 0.0
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                idle += step
                if idle < heartbeat_s:
                    continue
                idle = 0.0
                item = HEARTBEAT_FRAME
            if item is None:
                break
            # take whatever else is queued too: one write per wake-up, not per frame
            parts = [item]
            while not sub.queue.empty() and len(parts) < 64:
                nxt = sub.queue.get_nowait()
                if nxt is None:
                    sub.dropped = True
                    break
                parts.append(nxt)
            await resp.write(b"".join(parts))
    except (ConnectionError, RuntimeError, OSError):
        # the peer went away, or we aborted it (dropped): nothing more to say to it.
        # RuntimeError: aiohttp's "cannot write to closing transport".
        pass
    finally:
        channel.subscribers.discard(sub)
        channel.limit.release()
        if on_close is not None:
            on_close()
    return resp
