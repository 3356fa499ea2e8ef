"""A real `qwenvl-pd encode` on the tiny Qwen3-VL (deepstack included) with a real Mooncake
Store: Encode over gRPC, the handle's bytes read over a second Mooncake engine, hits counted,
bad input refused with a status, and the store serving a restarted encoder."""
import asyncio
import io
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
import torch
from PIL import Image

pytest.importorskip("mooncake.store")

from nodes import free_port, stop, wait_healthy  # noqa: E402
from qwenvl_pd.kv_transfer.embedding_key import bytes_hash  # noqa: E402
from qwenvl_pd.kv_transfer.embedding_store import holder_command, master_command  # noqa: E402
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine  # noqa: E402
from qwenvl_pd.messages import EmbeddingRelease, EncodeRequest, MediaItem  # noqa: E402
from qwenvl_pd.model.processor import process_images  # noqa: E402
from qwenvl_pd.model.video import process_videos  # noqa: E402
from qwenvl_pd.model.vision import encode  # noqa: E402
from qwenvl_pd.model.vision_config import VisionPreprocessConfig  # noqa: E402
from qwenvl_pd.model.vision_loader import load_vision_tower  # noqa: E402
from qwenvl_pd.model_config import ModelConfig  # noqa: E402
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(240)
SECRET = b"encode-test-secret"


def png(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


GRID = (1, 14, 20)  # of a 64x48 image with the tiny Qwen3-VL's processor: 70 vision tokens
ENTRY = 70 * 3 * 128 * 4  # its embeddings and 2 deepstack layers in float32
POOL_FOR_TWO = 2 * ENTRY + 1000  # the restarted encoder's pool: two such entries fit, not three


def image_item(data: bytes, grid=GRID) -> MediaItem:
    return MediaItem(kind="image", content_hash=bytes_hash(data), grid_thw=grid, data=data)


class Cluster:
    """mooncake_master, a mooncake_client lending the store its memory (it outlives encoders),
    one encoder lending none."""

    def __init__(self, model: str):
        self.model, self.master_port, holder_port = model, free_port(), free_port()
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.master = subprocess.Popen(master_command(self.master_port, free_port()), **quiet)
        wait_port(self.master_port, self.master)
        self.holder = subprocess.Popen(holder_command(f"127.0.0.1:{self.master_port}", holder_port, 64 << 20), **quiet)
        wait_port(holder_port, self.holder)
        self.encoder, self.address = self.start_encoder()

    def start_encoder(self, *extra: str):
        port = free_port()
        log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "qwenvl_pd.cli", "encode", "--model", self.model, "--port", str(port),
               "--host", "127.0.0.1", "--bind", "127.0.0.1", "--threads", "1", "--embedding-cache-gib", "0.01",
               "--embedding-store", f"127.0.0.1:{self.master_port}", "--embedding-store-segment-gib", "0",
               "--drain-seconds", "0", "--limit-images", "3", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                env={**_env(), "QWENVL_PD_CLUSTER_SECRET": SECRET.decode()})
        proc.log = log
        wait_healthy(f"127.0.0.1:{port}", proc)
        return proc, f"127.0.0.1:{port}"

    def restart_encoder(self, *extra: str):
        stop(self.encoder)
        self.encoder, self.address = self.start_encoder(*extra)

    def close(self):
        for proc in (self.encoder, self.holder, self.master):
            stop(proc)


def _env():
    import os
    return dict(os.environ)


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.args[0]} is not listening on {port} (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def cluster(tiny_dirs):
    c = Cluster(str(tiny_dirs["qwen3_vl"]))
    yield c
    c.close()


@pytest.fixture(scope="module")
def vision(tiny_dirs):
    return VisionPreprocessConfig.from_dir(tiny_dirs["qwen3_vl"])


@pytest.fixture(scope="module")
def reference(tiny_dirs, vision):
    """The tower's output for an image or a video, computed here in float32 on one thread (as
    the node runs it)."""
    cfg = ModelConfig.from_hf(tiny_dirs["qwen3_vl"])
    tower = load_vision_tower(tiny_dirs["qwen3_vl"], cfg, torch.float32)

    def run(data: bytes, kind: str = "image") -> torch.Tensor:
        px = process_images([data], vision) if kind == "image" else process_videos([data], vision, "qwen3_vl")
        pixels, grid = (px.pixel_values, px.image_grid_thw) if kind == "image" else \
            (px.pixel_values_videos, px.video_grid_thw)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                out = encode(tower, pixels, grid)
        finally:
            torch.set_num_threads(threads)
        return torch.cat([out.embeds.reshape(-1), out.deepstack.reshape(-1)])
    return run


async def call(address: str, method: str, msg):
    async with auth.channel(address, SECRET) as channel:
        return await getattr(pb_grpc.EncodeStub(channel), method)(msg, timeout=60)


def encode_items(address: str, *items: MediaItem):
    reply = asyncio.run(call(address, "Encode", convert.to_proto(EncodeRequest("r", items))))
    return convert.from_proto(reply)


def load(address: str):
    return convert.from_proto(asyncio.run(call(address, "GetLoad", pb.LoadRequest())))


def read_handle(handle) -> torch.Tensor:
    """The handle's bytes, read as prefill will: one Mooncake read into a registered buffer."""
    buf = torch.zeros(handle.nbytes, dtype=torch.uint8)
    with KVTransferEngine("127.0.0.1", timeout_s=5.0) as engine:
        engine.register(buf)
        engine.read(handle.transfer_address, buf.data_ptr(), handle.address, handle.nbytes)
    return buf.view(getattr(torch, handle.dtype))


def test_the_same_image_twice_is_encoded_once_and_reads_back_exactly(cluster, reference):
    data = png((10, 200, 30))
    first = encode_items(cluster.address, image_item(data))
    second = encode_items(cluster.address, image_item(data))
    assert (first.hits, second.hits) == (0, 1)
    report = load(cluster.address)
    assert (report.role, report.embedding_misses, report.embedding_hits) == ("encode", 1, 1)
    # embeds + 2 deepstack layers of 70 tokens x 128 float32: one entry, pinned by both leases
    assert (report.embedding_leases, report.embedding_bytes_used) == (1, 70 * 3 * 128 * 4)
    handle = second.handles[0]
    assert (handle.num_tokens, handle.num_deepstack, handle.hidden_size, handle.dtype) == (70, 2, 128, "float32")
    assert handle.key == first.handles[0].key and handle.in_store and auth.is_signed(handle, SECRET)
    assert torch.equal(read_handle(handle), reference(data))


def test_concurrent_requests_for_one_new_image_encode_it_once(cluster):
    before = load(cluster.address)
    item = image_item(png((250, 5, 90)))

    async def many():
        msg = convert.to_proto(EncodeRequest("c", (item, item)))
        return await asyncio.gather(*(call(cluster.address, "Encode", msg) for _ in range(4)))
    replies = [convert.from_proto(r) for r in asyncio.run(many())]
    after = load(cluster.address)
    assert sum(r.hits for r in replies) == 7
    assert (after.embedding_misses - before.embedding_misses, after.embedding_hits - before.embedding_hits) == (1, 7)
    assert len({h.key for r in replies for h in r.handles}) == 1


def test_a_video_is_encoded_once_and_reads_back_exactly(cluster, vision, reference, mp4):
    data = mp4()
    want = process_videos([data], vision, "qwen3_vl")
    item = MediaItem(kind="video", content_hash=bytes_hash(data), data=data,
                     grid_thw=tuple(want.video_grid_thw[0].tolist()), timestamps=want.timestamps[0])
    first, second = encode_items(cluster.address, item), encode_items(cluster.address, item)
    assert (first.hits, second.hits) == (0, 1)
    t, h, w = item.grid_thw
    assert second.handles[0].num_tokens == t * h * w // 4
    assert torch.equal(read_handle(second.handles[0]), reference(data, "video"))


def test_release_unpins_only_this_instances_leases(cluster):
    reply = encode_items(cluster.address, image_item(png((1, 2, 3))))
    pinned = load(cluster.address).embedding_leases
    lease = reply.handles[0].lease_id

    def release(instance_id):
        msg = convert.to_proto(EmbeddingRelease((lease,), instance_id))
        return asyncio.run(call(cluster.address, "Release", msg)).released
    assert release("encode-of-another-run") is False
    assert release(reply.handles[0].instance_id) is True
    assert release(reply.handles[0].instance_id) is False  # once only
    assert load(cluster.address).embedding_leases == pinned - 1


@pytest.mark.parametrize("items, message", [
    ((image_item(b"not an image"),), "not a decodable image"),
    ((image_item(png((9, 9, 9)), grid=(1, 4, 6)),), "the request says grid (1, 4, 6), the bytes give (1, 14, 20)"),
    ((image_item(png((9, 9, 9)), grid=(1, 400, 400)),), "gives 40000 vision tokens; one item may have 1 to 16384"),
    ((MediaItem(kind="image", content_hash="0" * 64, grid_thw=GRID, data=png((9, 9, 9))),),
     "is not the sha256 of its bytes"),
    (tuple(image_item(png((i, 0, 0))) for i in range(4)), "4 images in one Encode request; this encoder takes at most 3"),
])
def test_bad_input_is_invalid_argument(cluster, items, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        encode_items(cluster.address, *items)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_a_call_without_the_secret_is_refused(cluster):
    async def unsigned():
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            await pb_grpc.EncodeStub(channel).GetLoad(pb.LoadRequest(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(unsigned())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_store_serves_a_restarted_encoder(cluster, reference):
    data = png((10, 200, 30))  # encoded by the first test, put into the store then
    # long leases: the next test counts on this entry staying pinned
    cluster.restart_encoder("--embedding-cache-gib", str(POOL_FOR_TWO / 2**30), "--lease-seconds", "300")
    reply = encode_items(cluster.address, image_item(data))
    report = load(cluster.address)
    assert reply.hits == 1
    assert (report.embedding_store_hits, report.embedding_misses, report.embedding_hits) == (1, 0, 0)
    assert reply.handles[0].in_store and torch.equal(read_handle(reply.handles[0]), reference(data))


def test_a_pool_full_of_pinned_entries_refuses_until_one_is_released(cluster):
    # runs on the restarted encoder: its pool holds the previous test's entry, pinned
    second = encode_items(cluster.address, image_item(png((40, 40, 40))))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        encode_items(cluster.address, image_item(png((41, 41, 41))))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"embedding pool full: {ENTRY} bytes wanted" in err.value.details()
    msg = convert.to_proto(EmbeddingRelease((second.handles[0].lease_id,), second.handles[0].instance_id))
    assert asyncio.run(call(cluster.address, "Release", msg)).released
    third = encode_items(cluster.address, image_item(png((41, 41, 41))))
    assert third.handles[0].address == second.handles[0].address  # the released entry's place
