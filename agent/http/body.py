"""A request body read to its end, but never past a limit: the one bounded read of the
JSON endpoints that take a body (the coordinator's ``/api/services/register``, the
enrollment service's ``/api/network/enroll``).

Why a helper: aiohttp's ``content.read(n)`` returns what has arrived so far, so a body
split over TCP segments must be read in a loop until EOF (issue 20: a registration that
came in two segments was a 400), and the loop must stop one byte past the limit so an
oversized body is never buffered whole. Both endpoints had their own copy of that loop.
What a caller answers (413 for ``BodyTooLarge``, 400 for a read error) and how it parses
the bytes stay the caller's: the two endpoints word their errors differently.
"""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The body (declared by Content-Length, or as read) is over the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body too large (max {limit} bytes)")
        self.limit = limit


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body of ``request``, at most ``limit`` bytes; ``BodyTooLarge`` beyond.

    A declared ``Content-Length`` over the limit is refused before anything is read.
    Errors of the read itself (the client went away, a broken chunked encoding) pass
    to the caller as they are."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = await request.content.read(limit + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise BodyTooLarge(limit)
    return b"".join(chunks)
