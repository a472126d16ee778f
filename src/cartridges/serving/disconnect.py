"""Noticing that the client of a whole answer went away, so that its requests leave the batch.

A streamed answer needs nothing here: Starlette listens for the disconnect and closes the
stream. A whole answer's handler only waits for the engine, and nothing cancels it when its
client disconnects, so it also waits for the ``http.disconnect`` message and, when that comes
first, stops waiting: the engine then withdraws the job
(:meth:`~cartridges.serving.engine.ContinuousEngine.submit`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def disconnected(http: Request) -> None:
    """Return once the client has closed the connection (the request body was read before)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(answer: Awaitable[T], http: Request) -> T | None:
    """``answer``'s result, or ``None`` (``answer`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(disconnected(http))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return None
