"""Work proportional to a request's size runs here, never on the event loop.

Template rendering, tokenisation and request parsing (grammar compilation included) of a
multi-megabyte prompt took seconds; on the loop, /live and every other stream stopped for that
long. A small pool of its own keeps it from queueing behind media reads on asyncio's default one.
The tokenizer call must release the GIL too (see ProxyModel.encode), or the loop stalls anyway.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prompt")


async def off_loop(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the prompt pool; its exception is raised here."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))
