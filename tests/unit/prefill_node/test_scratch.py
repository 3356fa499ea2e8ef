"""The embedding read buffer: first-fit slots, aligned, merged when freed, a wait that ends with
a free or at its deadline."""
import asyncio
import time

import pytest

from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
from qwenvl_pd.prefill_node.scratch import Scratch, ScratchFull


@pytest.fixture(scope="module")
def transfer():
    engine = KVTransferEngine("127.0.0.1", timeout_s=1)
    yield engine
    engine.close()


def test_slots_are_aligned_first_fit_and_merge_back(transfer):
    async def run():
        s = Scratch(transfer, 1024)
        soon = time.monotonic() + 1
        a, b, c = [await s.take(n, soon) for n in (100, 64, 200)]
        assert (a, b, c) == (0, 128, 192)
        s.give(b, 64)
        assert await s.take(50, soon) == 128  # the first hole that fits
        s.give(128, 50)
        s.give(a, 100)
        s.give(c, 200)
        return s.free_bytes, await s.take(1024, soon)  # all merged back into one range
    assert asyncio.run(run()) == (1024, 0)


def test_a_take_waits_for_a_free_or_its_deadline(transfer):
    async def run():
        s = Scratch(transfer, 256)
        first = await s.take(256, time.monotonic() + 1)
        with pytest.raises(ScratchFull, match="no 64 B free"):
            await s.take(64, time.monotonic() + 0.05)
        waiting = asyncio.ensure_future(s.take(64, time.monotonic() + 5))
        await asyncio.sleep(0)
        s.give(first, 256)  # as a settled read does, from whatever thread
        return await waiting
    assert asyncio.run(run()) == 0


def test_a_slot_larger_than_the_buffer_is_refused_at_once(transfer):
    async def run():
        await Scratch(transfer, 256).take(257, time.monotonic() + 5)
    with pytest.raises(ScratchFull, match="257 B exceed the 256 B embedding read buffer"):
        asyncio.run(run())
