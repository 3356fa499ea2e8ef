"""Prefill reading vision embeddings instead of encoding (EPD): a real prefill process reads them
over real Mooncake from a buffer this test registered with its own transfer engine (what an
encode instance holds), and prefills exactly what the same request sent with bytes gives."""
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_pd import LLM
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.embedding_key import bytes_hash
from qwenvl_pd.kv_transfer.layout import Region
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
from qwenvl_pd.messages import EncodeRequest, MediaItem, PrefillRequest
from qwenvl_pd.model.vision_fingerprint import vision_fingerprint
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.sampling_params import SamplingParams

from nodes import free_port, png_bytes, start_node, stop, wait_healthy

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


class Encoder:
    """What an encode instance holds: embeddings a local tower made, in a registered pool."""

    def __init__(self, llm: LLM):
        self.llm, self.engine = llm, KVTransferEngine("127.0.0.1", timeout_s=2)
        cfg = llm.stack.config
        self.fingerprint = vision_fingerprint(cfg.family, cfg.vision, llm.model.vision_tower())
        self.pools = []

    def handle(self, item, key: str, **edits) -> EmbeddingHandle:
        with torch.inference_mode():
            e = self.llm.model.encode_vision(item.pixel_values, torch.tensor([item.grid_thw]))
        pool = torch.cat([e.embeds.flatten(), e.deepstack.flatten()]).float().contiguous()
        self.pools.append(pool)
        fields = dict(key=key, instance_id="encode-test", transfer_address=self.engine.session_id,
                      address=self.engine.register(pool), nbytes=pool.numel() * 4,
                      num_tokens=e.embeds.shape[0], hidden_size=e.embeds.shape[1], dtype="float32",
                      vision_fingerprint=self.fingerprint, num_deepstack=e.deepstack.shape[0],
                      control_address=f"127.0.0.1:{free_port()}", lease_id=f"lease-{key}")
        return EmbeddingHandle(**(fields | edits))


@pytest.fixture(scope="module")
def encoder(tiny_dirs):
    llm = LLM(model=str(tiny_dirs["qwen3_vl"]), max_model_len=2048)  # deepstack features included
    enc = Encoder(llm)
    yield enc
    enc.engine.close()


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def epd(request, tiny_dirs, encoder):
    """A prefill at TP 1 or 2: rank 0 reads, every rank gets the rows it injects."""
    proc, address = start_node("prefill", str(tiny_dirs["qwen3_vl"]), "--lease-seconds", "10",
                               "--transfer-timeout", "2", "--tensor-parallel-size", str(request.param))
    try:
        yield encoder.llm, encoder, address
    finally:
        stop(proc)


def _request(llm, rid: str, images: list[bytes], encoder=None, embedded=(), key: str = "img",
             **edits) -> PrefillRequest:
    body = f"<|im_start|>user\n{IMG * len(images)}Describe.<|im_end|>\n<|im_start|>assistant\n"
    prompt = llm.inputs.process({"prompt": body, "multi_modal_data": {"image": images}})
    media = tuple(MediaItem("image", it.content_hash, it.grid_thw, data=raw) if i not in embedded else
                  MediaItem("image", it.content_hash, it.grid_thw,
                            embedding=encoder.handle(it, key + str(i), **edits))
                  for i, (it, raw) in enumerate(zip(prompt.items, images)))
    # a salt per request: no prefix-cache block is shared, every request computes its own KV
    return PrefillRequest(rid, tuple(prompt.token_ids), media, PARAMS, cache_salt=rid)


def _kv(engine: KVTransferEngine, handle) -> torch.Tensor:
    """The request's KV read out of every prefill rank: [layers, 2, kv_heads, tokens, head_dim]."""
    return torch.cat([_rank_kv(engine, handle, r) for r in range(len(handle.segments))], dim=2)


def _rank_kv(engine: KVTransferEngine, handle, rank: int) -> torch.Tensor:
    fp, n = handle.fingerprint, len(handle.block_ids)
    remote = Region.from_handle(handle, rank)
    local = torch.empty(fp.num_layers * 2 * n * handle.block_bytes, dtype=torch.uint8)
    base = engine.register(local)
    slices = [(base + ((layer * 2 + plane) * n + j) * handle.block_bytes, remote.address(layer, plane, b),
               handle.block_bytes)
              for layer in range(fp.num_layers) for plane in (0, 1) for j, b in enumerate(handle.block_ids)]
    engine.read_batch(handle.segments[rank].transfer_address, slices)
    kv = local.view(torch.float32).view(fp.num_layers, 2, n, fp.heads_per_rank, fp.block_size, fp.head_dim)
    return kv.permute(0, 1, 3, 2, 4, 5).reshape(fp.num_layers, 2, fp.heads_per_rank, -1, fp.head_dim)


async def _prefill_all(address: str, reqs: list[PrefillRequest]):
    inst = Instance.connect("prefill", address)
    try:
        results = [await pd_client.prefill(inst, r) for r in reqs]
        return results, await pd_client.load(inst, "prefill")
    finally:
        for r in reqs:
            await pd_client.abort(inst, "prefill", r.request_id)
        await inst.channel.close()


def test_read_embeddings_prefill_exactly_what_the_bytes_do(epd):
    llm, encoder, address = epd
    images = [png_bytes(_image(96, 80, 1)), png_bytes(_image(64, 120, 2))]
    reqs = [_request(llm, "bytes", images), _request(llm, "mixed", images, encoder, embedded={0}),
            _request(llm, "embedded", images, encoder, embedded={0, 1})]
    results, load = asyncio.run(_prefill_all(address, reqs))
    want = _kv(encoder.engine, results[0].handle)
    for r in results[1:]:
        assert (r.first_token.token_id, r.prompt_len, r.mrope_position_delta) == \
               (results[0].first_token.token_id, results[0].prompt_len, results[0].mrope_position_delta)
        got = _kv(encoder.engine, r.handle)
        assert torch.equal(got[:, :, :, :r.prompt_len], want[:, :, :, :r.prompt_len])
    # "embedded" found image 0 (key img0) in prefill's encoder cache, read only image 1
    assert (load.embedding_reads, load.embedding_read_failures) == (2, 0)
    assert load.embedding_read_bytes == sum(encoder.pools[i].numel() * 4 for i in (0, 2))


async def _refused(address: str, req: PrefillRequest) -> tuple[grpc.aio.AioRpcError, object]:
    inst = Instance.connect("prefill", address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pd_client.prefill(inst, req)
        return err.value, await pd_client.load(inst, "prefill")
    finally:
        await inst.channel.close()


BAD = [(dict(vision_fingerprint="0" * 64), "item 0: made by other vision weights"),
       (dict(transfer_address=f"127.0.0.1:{free_port()}"), "item 0: reading from 127.0.0.1:"),
       (dict(lease_expires_unix_ms=1), "item 0: its lease on encode-test has expired")]


@pytest.mark.parametrize("epd", [1], indirect=True, ids=["tp1"])
def test_an_item_that_cannot_be_read_fails_with_embeddings_unavailable(epd):
    llm, encoder, address = epd
    image = png_bytes(_image(70, 70, 9))
    for n, (edit, why) in enumerate(BAD):
        req = _request(llm, f"bad{n}", [image], encoder, embedded={0}, key=f"bad{n}-", **edit)
        error, load = asyncio.run(_refused(address, req))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith("embeddings unavailable: " + why), error.details()
        assert (load.blocks_used, load.running, load.waiting) == (0, 0, 0)
        assert load.embedding_read_failures == n + 1


@contextmanager
def _encode_node(model: str):
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", "encode", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--bind", "127.0.0.1", "--threads", "1", "--embedding-cache-gib", "0.01",
           "--drain-seconds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    try:
        wait_healthy(f"127.0.0.1:{port}", proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


async def _through_encoder(encode_addr: str, prefill_addr: str, reqs: list[PrefillRequest]):
    """Encode the last request's media, send it to prefill with the handles; every result, the
    prefill's and the encoder's loads once prefill's Releases had time to land."""
    async with auth.channel(encode_addr) as channel:
        encoder = pb_grpc.EncodeStub(channel)
        last = reqs[-1]
        reply = await encoder.Encode(convert.to_proto(EncodeRequest("e", last.media)), timeout=60)
        handles = convert.from_proto(reply).handles
        media = tuple(dataclasses.replace(m, data=b"", embedding=h) for m, h in zip(last.media, handles))
        results, load = await _prefill_all(prefill_addr, reqs[:-1] + [dataclasses.replace(last, media=media)])
        for _ in range(50):
            leases = convert.from_proto(await encoder.GetLoad(pb.LoadRequest(), timeout=5)).embedding_leases
            if leases == 0:
                break
            await asyncio.sleep(0.1)
        return results, load, leases


def _as_the_proxy_sends(req: PrefillRequest, images: list[bytes]) -> PrefillRequest:
    """Content hashes of the bytes (the encoder checks them); prompt logprobs compare every position."""
    media = tuple(dataclasses.replace(m, content_hash=bytes_hash(d)) for m, d in zip(req.media, images))
    return dataclasses.replace(req, media=media, sampling=dataclasses.replace(PARAMS, prompt_logprobs=2))


@pytest.mark.parametrize("epd", [1], indirect=True, ids=["tp1"])
def test_handles_from_a_real_encode_node_prefill_what_the_bytes_do_and_are_released(epd, tiny_dirs):
    llm, _, address = epd
    images = [png_bytes(_image(88, 72, 5)), png_bytes(_image(72, 100, 6))]
    bytes_req, encoded = (_as_the_proxy_sends(_request(llm, rid, images), images) for rid in ("enc-b", "enc-h"))
    with _encode_node(str(tiny_dirs["qwen3_vl"])) as encode_addr:
        (want, got), _, leases = asyncio.run(_through_encoder(encode_addr, address, [bytes_req, encoded]))
    assert got.first_token == want.first_token and got.prompt_logprobs == want.prompt_logprobs
    assert leases == 0  # prefill's Release unpinned both entries
