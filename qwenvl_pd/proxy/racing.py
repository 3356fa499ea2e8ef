"""Running a piece of work only as long as something else has not happened."""
import asyncio
from collections.abc import Awaitable


async def unless(work: Awaitable, stop: Awaitable, timeout: float | None = None) -> asyncio.Future:
    """Run work until it finishes, stop does or timeout passes; the future of work comes back
    done, or cancelled and unwound (a stream's generator must not be running when it is closed).
    A stop given as a future is the caller's to keep across calls (a stream's token after token)."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(stop)
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not stop:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return task
