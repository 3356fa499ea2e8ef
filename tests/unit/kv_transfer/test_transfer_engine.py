"""KVTransferEngine in one process, no peer: argument checks, session id, lifecycle."""
import os

import pytest
import torch

pytest.importorskip("mooncake.engine")

from qwenvl_pd.kv_transfer.transfer_engine import (PROTOCOLS, KVTransferEngine, TransferError,  # noqa: E402
                                          _tcp_queue_bound)


@pytest.fixture
def engine():
    with KVTransferEngine("127.0.0.1", timeout_s=2.0) as eng:
        yield eng


def test_session_id_is_host_and_the_rpc_port_mooncake_reports(engine):
    host, port = engine.session_id.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert 0 < int(port) < 65536
    assert engine.session_id == f"127.0.0.1:{engine._engine.get_rpc_port()}"


def test_construction_leaves_the_process_environment_as_it_was():
    before = {k: os.environ.get(k) for k in ("MC_TRANSFER_TIMEOUT", "MC_FORCE_TCP",
                                             "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER")}
    with KVTransferEngine("127.0.0.1", timeout_s=1.0) as eng:
        assert eng.native_timeout_s == 5  # Mooncake's floor
    assert {k: os.environ.get(k) for k in before} == before


def test_batches_are_cut_to_fit_the_tcp_queue_mooncake_will_really_use(monkeypatch):
    assert [_tcp_queue_bound(v) for v in ("4096", "65535", "65536", "0", "x")] == [
        4096, 65535, 1024, 1024, 1024]
    with KVTransferEngine("127.0.0.1", max_inflight=4) as eng:
        assert eng.max_batch_slices == 1024  # our default queue of 4096, shared by 4 reads
    monkeypatch.setenv("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "100")
    with KVTransferEngine("127.0.0.1", max_inflight=3) as eng:
        assert eng.max_batch_slices == 33


def test_protocol_is_checked_against_the_allow_list():
    assert PROTOCOLS == ("tcp", "rdma", "ascend")
    with pytest.raises(ValueError, match="'hccs' is not one of"):
        KVTransferEngine("127.0.0.1", protocol="hccs")
    with pytest.raises(ValueError, match="timeout_s"):
        KVTransferEngine("127.0.0.1", timeout_s=0)


def test_rdma_without_an_rdma_device_is_an_error_not_a_silent_tcp_fallback():
    try:
        eng = KVTransferEngine("127.0.0.1", protocol="rdma")
    except TransferError as e:
        assert "no RDMA device" in str(e)
    else:  # this machine has an HCA: then rdma is genuinely available
        eng.close()


def test_register_keeps_the_tensor_and_refuses_non_contiguous(engine):
    kv = torch.zeros(2, 2, 4, 4, 2, 8)
    assert engine.register(kv) == kv.data_ptr()
    assert engine._regions[kv.data_ptr()] is kv
    with pytest.raises(ValueError, match="contiguous"):
        engine.register(torch.zeros(4, 4).t())
    with pytest.raises(TransferError, match="register_memory"):
        engine.register(kv)  # overlapping registration: Mooncake refuses, we say so


def test_local_destination_must_lie_inside_a_registered_region(engine):
    kv = torch.zeros(1024)
    engine.register(kv)
    with pytest.raises(ValueError, match="not inside a registered region"):
        engine.read("127.0.0.1:1", kv.data_ptr() + 4000, 0x1000, 200)  # runs 104 B past the end
    with pytest.raises(ValueError, match="not inside a registered region"):
        engine.read_batch("127.0.0.1:1", [(kv.data_ptr(), 0x1000, 16), (0x10, 0x1000, 16)])
    engine.read_batch("127.0.0.1:1", [])  # nothing to move: no call at all


def test_unreachable_peer_fails_with_peer_and_bytes_in_the_message(engine):
    kv = torch.zeros(1024)
    engine.register(kv)
    with pytest.raises(TransferError, match=r"4096 B in 1 slices from 127\.0\.0\.1:1: return code -1"):
        engine.read("127.0.0.1:1", kv.data_ptr(), 0x1000, 4096)


def test_close_is_idempotent_and_final():
    eng = KVTransferEngine("127.0.0.1")
    kv = torch.zeros(16)
    eng.register(kv)
    eng.close()
    eng.close()
    assert eng._regions == {}
    with pytest.raises(TransferError, match="closed"):
        eng.read("127.0.0.1:1", kv.data_ptr(), 0x1000, 16)
    with pytest.raises(TransferError, match="closed"):
        eng.register(kv)
