"""Several async streams read as one: n samples of a request, the prompts of a batch."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

T = TypeVar("T")


def fan_in(streams: list[AsyncGenerator[T, None]],
           on_error: Callable[[int, Exception], BaseException] = lambda i, e: e,
           on_close: Callable[[], None] = lambda: None) -> AsyncGenerator[T, None]:
    """Items of every stream as they come. The first stream to fail ends them all with
    on_error(its index, its error); on any exit every stream is closed, and on_close runs
    before that is awaited (a cancelled caller may not get past the next await).

    A lone stream is read in the caller's task, one item per request: it does not run on past
    an item before the caller has handled it. PD's first token thus reaches the client before
    the sample goes on to open its decode stream, as colocated's does."""
    if len(streams) == 1:
        return _one(streams[0], on_error, on_close)
    return _many(streams, on_error, on_close)


async def _one(stream: AsyncGenerator[T, None], on_error, on_close) -> AsyncGenerator[T, None]:
    try:
        while True:
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return
            except Exception as e:
                raise on_error(0, e)
            yield item
    finally:
        on_close()
        await stream.aclose()


async def _many(streams: list[AsyncGenerator[T, None]], on_error, on_close) -> AsyncGenerator[T, None]:
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
