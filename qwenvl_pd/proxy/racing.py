"""Running a piece of work only as long as something else has not happened."""
import asyncio
from collections.abc import Awaitable


async def unless(work: Awaitable, stop: Awaitable) -> asyncio.Future:
    """Run work until it finishes or stop does; the future of work comes back done, or cancelled
    and unwound (a stream's generator must not be running when it is closed)."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(stop)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return task
