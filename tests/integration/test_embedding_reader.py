"""Prefill's embedding reader against real Mooncake on loopback: an encoder process holding the
embeddings (alive, dead or stopped), a Mooncake Store behind its own mooncake_master, and the
local encoder cache; every failure is EmbeddingUnavailable in bounded time, no slot leaks."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenvl_pd.engine.encoder_cache import EncoderCache
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.embedding_store import EmbeddingStore
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
from qwenvl_pd.messages import MediaItem
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.prefill_node.embedding_reader import EmbeddingReader, EmbeddingRefused, EmbeddingUnavailable, ReaderConfig
from qwenvl_pd.protos import auth

from nodes import free_port

N, D, DEEP = 4, 8, 2  # tokens, hidden, deepstack layers: a grid (1, 4, 4) with merge 2
FP = "f" * 64
VALUES = torch.arange((1 + DEEP) * N * D, dtype=torch.float32)  # embeds, then deepstack
ENCODER = """
import sys, torch
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
engine = KVTransferEngine("127.0.0.1", timeout_s=2)
pool = torch.arange({n}, dtype=torch.float32)
print(engine.session_id, engine.register(pool), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def encoder():
    """A process holding VALUES in a registered pool: (proc, session, address)."""
    proc = subprocess.Popen([sys.executable, "-c", ENCODER.format(n=VALUES.numel())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    session, address = proc.stdout.readline().split()
    yield proc, session, int(address)
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def transfer():
    engine = KVTransferEngine("127.0.0.1", timeout_s=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def store():
    master = shutil.which("mooncake_master") or str(Path(sys.executable).parent / "mooncake_master")
    port = free_port()
    proc = subprocess.Popen([master, f"--port={port}", "--enable_http_metadata_server=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writer = _joined(f"127.0.0.1:{port}", segment_bytes=32 << 20)
    reader = _joined(f"127.0.0.1:{port}", segment_bytes=0)
    yield writer, reader
    writer.close()
    reader.close()
    proc.kill()
    proc.wait()


def _joined(master: str, segment_bytes: int) -> EmbeddingStore:
    for _ in range(50):  # the master takes a moment to listen
        try:
            return EmbeddingStore(master, segment_bytes=segment_bytes, buffer_bytes=16 << 20)
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"no mooncake_master at {master}")


def _handle(session: str, address: int, **edits) -> EmbeddingHandle:
    fields = dict(key="k", instance_id="enc", transfer_address=session, address=address,
                  nbytes=VALUES.numel() * 4, num_tokens=N, hidden_size=D, dtype="float32",
                  vision_fingerprint=FP, num_deepstack=DEEP)
    return EmbeddingHandle(**(fields | edits))


def _item(handle: EmbeddingHandle) -> MediaItem:
    return MediaItem("image", "h", (1, 4, 4), embedding=handle)


def _reader(transfer, cache=None, store_get=None, buffer_bytes=1 << 20, secret=b"",
            allowed=()) -> EmbeddingReader:
    cfg = ReaderConfig(FP, D, 2, timeout_s=1, buffer_bytes=buffer_bytes, cluster_secret=secret,
                       allowed_encoders=allowed)
    return EmbeddingReader(cfg, transfer, (cache or EncoderCache(1 << 20)).get, store_get)


def _read(reader: EmbeddingReader, *items: MediaItem):
    return asyncio.run(reader.read(items))


def _assert_values(e: VisionEmbeds) -> None:
    assert torch.equal(e.embeds, VALUES[:N * D].view(N, D))
    assert torch.equal(e.deepstack, VALUES[N * D:].view(DEEP, N, D))


def test_one_read_per_item_copies_the_embeddings_out_and_frees_its_slot(encoder, transfer):
    _, session, address = encoder
    reader = _reader(transfer)
    bytes_item = MediaItem("image", "b", (1, 4, 4), data=b"png")
    got = _read(reader, bytes_item, _item(_handle(session, address)),
                _item(_handle(session, address, key="k2")))
    assert got[0] is None
    _assert_values(got[1])
    _assert_values(got[2])
    counters = reader.counters
    assert (counters.reads, counters.read_bytes, counters.failures) == (2, 2 * 4 * VALUES.numel(), 0)
    assert reader._scratch.free_bytes == 1 << 20


def test_the_local_encoder_cache_answers_before_any_read(transfer):
    cache = EncoderCache(1 << 20)
    cache._put("k", VisionEmbeds(VALUES[:N * D].view(N, D), VALUES[N * D:].view(DEEP, N, D)))
    reader = _reader(transfer, cache)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: a read would fail
    _assert_values(_read(reader, _item(_handle(dead, 4096)))[0])
    assert reader.counters.reads == 0


@pytest.mark.parametrize("edit, why", [
    (dict(vision_fingerprint="0" * 64), "item 0: made by other vision weights"),
    (dict(lease_expires_unix_ms=int(time.time() * 1000) - 1), "item 0: its lease on enc has expired"),
    (dict(num_tokens=2, nbytes=2 * (1 + DEEP) * D * 4), "item 0: float32 [2, 8]"),
    (dict(dtype="int8", nbytes=VALUES.numel()), "item 0: int8 [4, 8]"),
    (dict(transfer_address="127.0.0.1:1"), "item 0: reading from 127.0.0.1:1 failed"),
])
def test_a_handle_that_cannot_be_used_is_refused(encoder, transfer, edit, why):
    _, session, address = encoder
    reader = _reader(transfer)
    with pytest.raises(EmbeddingUnavailable, match="^" + why.replace("[", r"\[")):
        _read(reader, _item(_handle(session, address, **edit)))
    assert reader.counters.failures == 1


def test_with_the_cluster_secret_only_signed_handles_are_read(encoder, transfer):
    _, session, address = encoder
    reader = _reader(transfer, secret=b"s3cret")
    with pytest.raises(EmbeddingUnavailable, match="not signed with the cluster secret"):
        _read(reader, _item(_handle(session, address)))
    _assert_values(_read(reader, _item(auth.sign(_handle(session, address), b"s3cret")))[0])


def test_with_allowed_encoders_a_handle_naming_another_host_is_refused_before_any_read_or_release(
        encoder, transfer):
    _, session, address = encoder
    reader = _reader(transfer, allowed=("localhost",))
    _assert_values(_read(reader, _item(_handle(session, address)))[0])
    outside = _handle(session, address, control_address="10.255.255.9:50053", lease_id="L1")
    with pytest.raises(EmbeddingRefused) as refused:
        _read(reader, _item(_handle(session, address, key="k2")), _item(outside))
    assert str(refused.value) == ("item 1's embedding handle names 10.255.255.9, not an encoder this prefill "
                                  "reads from (--allowed-encoders localhost)")
    assert (reader.counters.reads, reader.counters.failures, reader.releases.pending) == (1, 1, 0)


def test_an_item_larger_than_the_read_buffer_is_refused(encoder, transfer):
    _, session, address = encoder
    with pytest.raises(EmbeddingUnavailable, match="exceed the 256 B embedding read buffer"):
        _read(_reader(transfer, buffer_bytes=256), _item(_handle(session, address)))


def test_a_failed_direct_read_falls_back_to_the_store(transfer, store):
    writer, reader_client = store
    assert writer.put("in-store", VALUES.numpy().tobytes())
    reader = _reader(transfer, store_get=reader_client.get)
    dead = f"127.0.0.1:{free_port()}"
    _assert_values(_read(reader, _item(_handle(dead, 4096, key="in-store", in_store=True)))[0])
    assert reader.counters.reads == 1
    with pytest.raises(EmbeddingUnavailable, match="failed .*; the store holds no 384 B entry"):
        _read(reader, _item(_handle(dead, 4096, key="absent", in_store=True)))


def test_a_stopped_encoder_fails_the_read_in_bounded_time_and_the_slot_comes_back(encoder, transfer):
    proc, session, address = encoder
    reader = _reader(transfer)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(EmbeddingUnavailable, match="reading from .* timed out"):
            _read(reader, _item(_handle(session, address, key="hung")))
        deadline = time.monotonic() + 30  # Mooncake's own deadline settles the native call
        while reader._scratch.free_bytes != 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reader._scratch.free_bytes == 1 << 20
    finally:
        os.kill(proc.pid, signal.SIGCONT)
