import asyncio

import grpc

from qwenvl_pd.protos.channel_cache import ChannelCache


def test_past_the_limit_the_least_recently_used_channel_is_closed():
    async def scenario():
        opened = []

        def open_channel(address):
            opened.append(address)
            return grpc.aio.insecure_channel(address)

        cache = ChannelCache(open_channel, limit=2)
        a = cache.get("127.0.0.1:1")
        cache.get("127.0.0.1:2")
        assert cache.get("127.0.0.1:1") is a  # reused, and now the most recent
        c = cache.get("127.0.0.1:3")  # evicts :2, the least recently used
        await asyncio.sleep(0.05)
        evicted_open = [len(cache), list(opened)]
        b = cache.get("127.0.0.1:2")  # opened anew, evicting :1
        states = [ch.get_state() for ch in (b, c)]
        for ch in (b, c):
            await ch.close()
        return evicted_open, opened, states

    evicted_open, opened, states = asyncio.run(scenario())
    assert evicted_open == [2, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]]
    assert opened == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:2"]
    assert grpc.ChannelConnectivity.SHUTDOWN not in states


def test_an_evicted_channel_is_shut_down():
    async def scenario():
        cache = ChannelCache(grpc.aio.insecure_channel, limit=1)
        first = cache.get("127.0.0.1:1")
        second = cache.get("127.0.0.1:2")
        await asyncio.sleep(0.1)
        state = first.get_state()
        await second.close()
        return state, len(cache)

    assert asyncio.run(scenario()) == (grpc.ChannelConnectivity.SHUTDOWN, 1)
