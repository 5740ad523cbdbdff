"""Small asyncio helpers shared by several components (below all of them).

``SingleFlight``: concurrent calls for one key share one execution of the work. Used by
discovery (one DHT crawl per service however many callers ask at once) and by the DHT's
HTTP API (one topology crawl at a time), so it lives below both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class SingleFlight:
    """Concurrent calls for one key share one execution of the work.

    The work runs in its own task, so a caller that is cancelled (client went away) does
    not cancel it for the others. ``joined`` counts calls that did not start work.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[object]] = {}
        self.joined = 0

    def __contains__(self, key: str) -> bool:
        return key in self._inflight

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        fut = self._inflight.get(key)
        if fut is not None:
            self.joined += 1
            return await asyncio.shield(fut)  # type: ignore[return-value]

        async def runner() -> T:
            try:
                return await work()
            finally:
                self._inflight.pop(key, None)

        task: asyncio.Future[object] = asyncio.ensure_future(runner())
        # if every caller went away, the outcome is still "retrieved" (no asyncio warning)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._inflight[key] = task
        return await asyncio.shield(task)  # type: ignore[return-value]

    async def cancel_all(self) -> None:
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
