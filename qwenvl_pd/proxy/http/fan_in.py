"""Several async streams read as one: n samples of a request, the prompts of a batch."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def fan_in(streams: list[AsyncGenerator[T, None]],
                 on_error: Callable[[int, Exception], BaseException] = lambda i, e: e,
                 on_close: Callable[[], None] = lambda: None) -> AsyncIterator[T]:
    """Items of every stream as they come. The first stream to fail ends them all with
    on_error(its index, its error); on any exit every stream is closed, and on_close runs
    before that is awaited (a cancelled caller may not get past the next await)."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, s, queue, on_error)) for i, s in enumerate(streams)]
    try:
        for _ in tasks:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for t in tasks:
            t.cancel()
        on_close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(i: int, stream: AsyncGenerator, queue: asyncio.Queue, on_error) -> None:
    try:
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                queue.put_nowait(item)
    except Exception as e:  # handed to the consumer, which ends every stream
        queue.put_nowait(on_error(i, e))
    finally:
        queue.put_nowait(None)
