"""Per-peer read workers: a peer's reads run at most per_peer at once, idle pools are evicted LRU."""
import threading

from qwenvl_pd.kv_transfer.peer_pools import PeerPools


def test_a_busy_peer_leaves_the_others_their_workers():
    pools, gate = PeerPools(per_peer=1), threading.Event()
    blocked = pools.submit("hung", gate.wait, 10)
    queued = pools.submit("hung", lambda: "late")
    assert pools.submit("healthy", lambda: "ok").result(timeout=5) == "ok"
    assert not queued.done()  # behind its own peer's one worker, not behind the others
    gate.set()
    assert blocked.result(timeout=5) is True and queued.result(timeout=5) == "late"
    pools.shutdown()


def test_idle_pools_beyond_the_bound_are_evicted_least_recent_first():
    pools, gate = PeerPools(per_peer=1, max_peers=2), threading.Event()
    busy = pools.submit("a", gate.wait, 10)
    for peer in ("b", "c", "d"):
        pools.submit(peer, int).result(timeout=5)
    assert pools.peers() == ["a", "d"]  # "a" is busy: kept though least recent
    gate.set()
    busy.result(timeout=5)
    pools.submit("e", int).result(timeout=5)
    assert pools.peers() == ["d", "e"]
    pools.shutdown()
    assert pools.peers() == []
