"""Running a piece of work only as long as something else has not happened (a stop, a timeout, an
instance that stops answering health checks)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from qwenvl_pd.proxy.cluster.instance import Instance


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


def no_answer(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    # what a call to a hung instance would end with, had gRPC noticed: one path for all failures
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


async def unless_lost(state: Instance, awaitable, lost: asyncio.Future | None = None,
                       timeout: float | None = None):
    """awaitable's result, unless the instance stops answering health checks (lost: a waiter on
    state.lost kept by the caller) or timeout passes first."""
    work = await unless(awaitable, state.lost.wait() if lost is None else lost, timeout)
    if not work.cancelled():
        return work.result()
    if state.lost.is_set():
        raise no_answer(grpc.StatusCode.UNAVAILABLE, f"{state.address} stopped answering health checks")
    raise no_answer(grpc.StatusCode.DEADLINE_EXCEEDED, f"no token for {timeout:g} s from {state.address}")
