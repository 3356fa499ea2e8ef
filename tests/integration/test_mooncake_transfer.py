"""Two real Mooncake engines in two processes on 127.0.0.1 over tcp: exact block moves, and a
peer that dies or hangs turns into a TransferError in bounded time, never a hang."""
import asyncio
import os
import signal
import time

import pytest
import torch

pytest.importorskip("mooncake.engine")

from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine, TransferError, TransferTimeout  # noqa: E402
from qwenvl_pd.kv_transfer.layout import Region, read_slices  # noqa: E402
from qwenvl_pd.kv_transfer.peer import pattern, spawn_peer  # noqa: E402

pytestmark = pytest.mark.timeout(120)
REMOTE_SHAPE = (3, 2, 16, 4, 2, 8)  # layers, K/V, blocks, kv_heads, block_size, head_dim
LOCAL_BLOCKS = 12  # decode's region is sized independently of prefill's


@pytest.fixture(scope="module")
def peer():
    with spawn_peer(REMOTE_SHAPE) as p:
        yield p
        p.stop()
        assert p.proc.returncode == 0  # a clean shutdown, not a crash on close


@pytest.fixture
def local():
    kv = torch.zeros(*REMOTE_SHAPE[:2], LOCAL_BLOCKS, *REMOTE_SHAPE[3:])
    with KVTransferEngine("127.0.0.1", timeout_s=5.0) as eng:
        eng.register(kv)
        yield eng, kv


def check_moved(kv: torch.Tensor, remote_ids: list[int], local_ids: list[int]) -> None:
    expected = pattern(REMOTE_SHAPE)
    assert torch.equal(kv[:, :, local_ids], expected[:, :, remote_ids])
    untouched = [b for b in range(LOCAL_BLOCKS) if b not in local_ids]
    assert torch.count_nonzero(kv[:, :, untouched]).item() == 0


def wait_stopped(pid: int, timeout_s: float = 10.0) -> None:
    """SIGSTOP lands asynchronously: wait (bounded) until every thread of pid is stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in "Tt" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s")


@pytest.mark.parametrize("remote_ids, local_ids, n_slices", [
    ([3, 4, 5, 9, 10], [0, 1, 2, 7, 8], 2 * 3 * 2),   # two runs
    ([15, 14, 0], [4, 5, 6], 3 * 3 * 2),              # descending remote ids: one slice per block
    (list(range(8)), list(range(4, 12)), 3 * 2),      # one long run
])
@pytest.mark.parametrize("on_loop", [False, True], ids=["sync", "async"])
def test_batched_read_moves_exactly_the_selected_blocks(peer, local, remote_ids, local_ids, n_slices, on_loop):
    eng, kv = local
    slices = read_slices(Region.from_tensor(kv), peer.region, remote_ids, local_ids)
    assert len(slices) == n_slices
    if on_loop:
        asyncio.run(eng.read_batch_async(peer.session, slices))
    else:
        eng.read_batch(peer.session, slices)
    check_moved(kv, remote_ids, local_ids)


def test_single_slice_read(peer, local):
    eng, kv = local
    (loc, rem, n), = read_slices(Region.from_tensor(kv), peer.region, [7], [2])[1:2]  # layer 0 V
    eng.read(peer.session, loc, rem, n)
    assert torch.equal(kv[0, 1, 2], pattern(REMOTE_SHAPE)[0, 1, 7])
    assert torch.count_nonzero(kv).item() == kv[0, 1, 2].numel()


def test_a_batch_larger_than_the_tcp_queue_is_cut_into_chunks(peer, monkeypatch):
    # queue 64 -> 16 slices per call; 2304 slices in one call would be refused as queue-full
    monkeypatch.setenv("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "64")
    kv = torch.zeros(*REMOTE_SHAPE[:2], LOCAL_BLOCKS, *REMOTE_SHAPE[3:])
    with KVTransferEngine("127.0.0.1", timeout_s=20.0) as eng:
        eng.register(kv)
        assert eng.max_batch_slices == 16
        n = kv.nbytes // 8
        eng.read_batch(peer.session, [(kv.data_ptr() + 8 * i, peer.region.base + 8 * i, 8)
                                      for i in reversed(range(n))])
    assert torch.equal(kv.flatten(), pattern(REMOTE_SHAPE).flatten()[:kv.numel()])


def test_reading_outside_the_peer_region_fails_cleanly(peer, local):
    eng, kv = local
    with pytest.raises(TransferError, match=f"from {peer.session}: return code"):
        eng.read(peer.session, kv.data_ptr(), peer.region.base + peer.region.nbytes, 64)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_read_from_an_exited_peer_fails_fast(local, how):
    eng, kv = local
    with spawn_peer(REMOTE_SHAPE) as p:
        slices = read_slices(Region.from_tensor(kv), p.region, [1, 2], [1, 2])
        eng.read_batch(p.session, slices)  # connected and cached before the peer goes
        p.stop() if how == "stop" else p.kill()
        assert p.proc.poll() is not None
        kv.zero_()
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=f"from {p.session}: return code -1"):
            eng.read_batch(p.session, slices)
        assert time.monotonic() - t0 < eng.timeout_s  # refused connection: no waiting at all


def test_hung_peer_times_out_and_reports_when_the_late_read_settles():
    kv = torch.zeros(*REMOTE_SHAPE[:2], LOCAL_BLOCKS, *REMOTE_SHAPE[3:])
    eng = KVTransferEngine("127.0.0.1", timeout_s=1.0)
    try:
        eng.register(kv)
        with spawn_peer(REMOTE_SHAPE) as p:
            slices = read_slices(Region.from_tensor(kv), p.region, [1, 2], [1, 2])
            eng.read_batch(p.session, slices)
            os.kill(p.proc.pid, signal.SIGSTOP)  # alive but silent: the case a deadline is for
            wait_stopped(p.proc.pid)
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout, match=r"timed out reading 3072 B in 6 slices") as err:
                eng.read_batch(p.session, slices)
            assert 0.9 < time.monotonic() - t0 < 3.0
            t1 = time.monotonic()
            with pytest.raises(TransferTimeout, match=r"timed out reading 3072 B in 6 slices") as late:
                asyncio.run(eng.read_batch_async(p.session, slices))  # the same bound on an event loop
            assert 0.9 < time.monotonic() - t1 < 3.0
            assert late.value.settled.result(timeout=eng.native_timeout_s + 10) == -1
            # Mooncake's own deadline (5 s floor) ends the native call; only then are blocks free.
            assert err.value.settled.result(timeout=eng.native_timeout_s + 10) == -1
            assert time.monotonic() - t0 < eng.native_timeout_s + 10
    finally:
        t0 = time.monotonic()
        eng.close()
        assert time.monotonic() - t0 < 15


def test_reads_from_a_hung_peer_do_not_starve_reads_from_a_healthy_one(peer):
    kv = torch.zeros(*REMOTE_SHAPE[:2], LOCAL_BLOCKS, *REMOTE_SHAPE[3:])
    eng = KVTransferEngine("127.0.0.1", timeout_s=1.0, max_inflight=2)
    try:
        eng.register(kv)
        with spawn_peer(REMOTE_SHAPE) as hung:
            slices = read_slices(Region.from_tensor(kv), hung.region, [1, 2], [1, 2])
            eng.read_batch(hung.session, slices)
            os.kill(hung.proc.pid, signal.SIGSTOP)
            wait_stopped(hung.proc.pid)

            async def hung_reads():  # more than every worker a shared pool would have
                return await asyncio.gather(*(eng.read_batch_async(hung.session, slices) for _ in range(4)),
                                            return_exceptions=True)
            failed = asyncio.run(hung_reads())
            assert [type(e) for e in failed] == [TransferTimeout] * 2 + [TransferError] * 2
            kv.zero_()
            eng.read_batch(peer.session, read_slices(Region.from_tensor(kv), peer.region, [3, 4], [5, 6]))
            check_moved(kv, [3, 4], [5, 6])
    finally:
        eng.close()
