"""Items given as embeddings are placed by their grids alone: token ids, M-RoPE positions and
spans equal the pixel path's exactly, and no pixel is made for them."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from qwenvl_pd.messages import MediaItem, PrefillRequest
from qwenvl_pd.model.inputs import Embedded, InputError, InputProcessor
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.node.requests import sequence_from_request
from qwenvl_pd.sampling_params import SamplingParams

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def _png(w, h, seed) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _frames(n, seed):
    return [Image.open(io.BytesIO(_png(64, 64, seed + i))) for i in range(n)]


CASES = {
    "one_image": (f"{IMG}What is this?", {"image": [_png(96, 80, 1)]}),
    "two_images": (f"{IMG}{IMG}Compare.", {"image": [_png(64, 120, 2), _png(150, 60, 3)]}),
    "video": (f"{VID}What happens?", {"video": [_frames(8, 10)]}),
    "image_and_video": (f"{IMG}then{VID}and?", {"image": [_png(96, 80, 1)], "video": [_frames(6, 20)]}),
}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def inputs(request, tiny_dirs):
    path = tiny_dirs[request.param]
    tok = AutoTokenizer.from_pretrained(path)
    return InputProcessor(path, ModelConfig.from_hf(path), tok.encode, 4096, {})


def _pixel_path(inputs, case):
    body, mm = CASES[case]
    return inputs.process({"prompt": body, "multi_modal_data": mm}), mm


def _embedded(inputs, prompt, keep: set[int] = frozenset()) -> tuple[list, list]:
    """The pixel prompt's media, each as Embedded (zeros of the right shape) unless in keep."""
    hidden = inputs.config.vision.out_hidden_size
    secs = iter((prompt.videos.second_per_grid_ts or ()) if prompt.videos else ())
    out = {"image": [], "video": []}
    for i, it in enumerate(prompt.items):
        sec = next(secs, None) if it.kind == "video" else None
        out[it.kind].append(i if i in keep else
                            Embedded(it.grid_thw, f"key{i}", VisionEmbeds(torch.zeros(it.num_tokens, hidden)), sec))
    return out["image"], out["video"]


@pytest.mark.parametrize("case", list(CASES))
def test_grid_only_path_equals_the_pixel_path(inputs, case):
    want, _ = _pixel_path(inputs, case)
    images, videos = _embedded(inputs, want)
    got = inputs.process_expanded(want.token_ids, images, videos)
    assert got.token_ids == want.token_ids and got.mrope_delta == want.mrope_delta
    assert torch.equal(got.positions, want.positions)
    assert [(it.span, it.grid_thw, it.num_tokens) for it in got.items] == \
           [(it.span, it.grid_thw, it.num_tokens) for it in want.items]
    assert [it.content_hash for it in got.items] == [f"key{i}" for i in range(len(want.items))]
    assert all(it.pixel_values is None and it.embeds is not None for it in got.items)
    assert got.images is None and got.videos is None  # nothing went through the processor


def test_a_mix_processes_only_the_items_given_as_bytes(inputs):
    want, mm = _pixel_path(inputs, "image_and_video")
    images, videos = _embedded(inputs, want, keep={0})
    images = [mm["image"][0]]
    got = inputs.process_expanded(want.token_ids, images, videos)
    assert torch.equal(got.positions, want.positions) and got.mrope_delta == want.mrope_delta
    assert got.items[0].content_hash == want.items[0].content_hash
    assert torch.equal(got.items[0].pixel_values, want.items[0].pixel_values)
    assert got.items[1].pixel_values is None and got.items[1].content_hash == "key1"


def test_embeddings_of_the_wrong_size_are_refused(inputs):
    want, _ = _pixel_path(inputs, "one_image")
    it, hidden = want.items[0], inputs.config.vision.out_hidden_size
    short = Embedded(it.grid_thw, "k", VisionEmbeds(torch.zeros(it.num_tokens - 1, hidden)))
    with pytest.raises(InputError, match=f"have {it.num_tokens - 1} rows; grid .* needs {it.num_tokens}"):
        inputs.process_expanded(want.token_ids, [short], [])


def test_a_request_of_handles_becomes_a_sequence_keyed_by_the_embedding_key(inputs):
    want, _ = _pixel_path(inputs, "two_images")
    hidden = inputs.config.vision.out_hidden_size
    second = want.items[1]
    media = (_handle_item(want.items[0], hidden),
             MediaItem("image", second.content_hash, second.grid_thw, data=CASES["two_images"][1]["image"][1]))
    req = PrefillRequest("r", tuple(want.token_ids), media, SamplingParams(max_tokens=4))
    embeds = [VisionEmbeds(torch.ones(want.items[0].num_tokens, hidden)), None]
    seq = sequence_from_request(inputs, req, 4096, embeds=embeds)
    assert torch.equal(seq.prompt_positions, want.positions)
    assert [s[2] for s in seq.mm_spans] == ["embkey", want.items[1].content_hash]
    with pytest.raises(ValueError, match="embedding handle that was not read"):
        sequence_from_request(inputs, req, 4096)


def _handle_item(it, hidden) -> MediaItem:
    from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
    handle = EmbeddingHandle(key="embkey", instance_id="e", transfer_address="127.0.0.1:1", address=0,
                             nbytes=it.num_tokens * hidden * 4, num_tokens=it.num_tokens,
                             hidden_size=hidden, dtype="float32", vision_fingerprint="f")
    return MediaItem("image", it.content_hash, it.grid_thw, embedding=handle)
