import asyncio

import pytest

from qwenvl_pd.proxy.http.fan_in import fan_in


async def _items(log: list, name: str, items, fail: Exception | None = None):
    try:
        for item in items:
            yield item
            log.append(f"{name} resumed after {item}")
        if fail is not None:
            raise fail
    finally:
        log.append(f"{name} closed")


def test_lone_stream_does_not_run_on_before_its_item_is_handled():
    # PD: the first token must reach the client before the sample opens its decode stream
    async def main():
        log: list = []
        merged = fan_in([_items(log, "a", [1, 2])])
        first = await anext(merged)
        seen = list(log)
        rest = [item async for item in merged]
        return first, seen, rest, log
    first, seen, rest, log = asyncio.run(main())
    assert (first, seen, rest) == (1, [], [2])
    assert log == ["a resumed after 1", "a resumed after 2", "a closed"]


def test_lone_stream_error_is_mapped_and_on_close_runs_before_the_stream_closes():
    async def main():
        log: list = []
        merged = fan_in([_items(log, "a", [1], ValueError("boom"))],
                        on_error=lambda i, e: RuntimeError(f"sample {i}: {e}"),
                        on_close=lambda: log.append("on_close"))
        got = [await anext(merged)]
        with pytest.raises(RuntimeError, match="^sample 0: boom$"):
            await anext(merged)
        return got, log
    got, log = asyncio.run(main())
    assert got == [1]
    assert log == ["a resumed after 1", "a closed", "on_close"]


def test_lone_stream_closed_early_runs_on_close_then_closes_the_stream():
    async def main():
        log: list = []
        merged = fan_in([_items(log, "a", [1, 2, 3])], on_close=lambda: log.append("on_close"))
        first = await anext(merged)
        await merged.aclose()
        return first, log
    first, log = asyncio.run(main())
    assert first == 1
    assert log == ["on_close", "a closed"]


def test_several_streams_all_arrive_and_an_error_ends_them_all():
    async def main():
        log: list = []
        merged = fan_in([_items(log, "a", [1, 2]), _items(log, "b", [10], ValueError("bad"))],
                        on_error=lambda i, e: RuntimeError(f"sample {i}: {e}"),
                        on_close=lambda: log.append("on_close"))
        got = []
        with pytest.raises(RuntimeError, match="^sample 1: bad$"):
            async for item in merged:
                got.append(item)
        return got, log
    got, log = asyncio.run(main())
    assert sorted(got) == [1, 2, 10]
    assert log.count("on_close") == 1 and "a closed" in log and "b closed" in log
