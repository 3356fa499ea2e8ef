"""M-RoPE positions equal transformers 5.23's get_rope_index (Qwen2.5-VL and Qwen3-VL).

get_rope_index only reads config.vision_config and calls get_vision_position_ids, so it runs on a
small stand-in object holding a real config: no model weights are built.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from qwenvl_pd.model.mrope import decode_positions, mrope_positions
from qwenvl_pd.model.grid import VisionTokenIds, expand_placeholders

IDS = VisionTokenIds()
TPS = 2  # tokens_per_second of the real Qwen2.5-VL checkpoints


class _Q25:
    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    def __init__(self):
        self.config = Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2, "tokens_per_second": TPS})


class _Q3:
    get_rope_index = Qwen3VLModel.get_rope_index
    get_vision_position_ids = Qwen3VLModel.get_vision_position_ids

    def __init__(self):
        self.config = Qwen3VLConfig(vision_config={"spatial_merge_size": 2})


REF = {"qwen2_5_vl": _Q25(), "qwen3_vl": _Q3()}


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _prompt(n_images: int, n_videos: int) -> list[int]:
    """Chat-like ids: text, then each image / video framed by vision start/end, then more text."""
    ids = _encode("system prompt\nuser:")
    for pad, n in ((IDS.image_pad, n_images), (IDS.video_pad, n_videos)):
        for _ in range(n):
            ids += [IDS.vision_start, pad, IDS.vision_end] + _encode(" and ")
    return ids + _encode("what is shown? assistant:")


def _check(family, images=None, videos=None, seconds=None, stamps=None):
    ids = _prompt(len(images or []), len(videos or []))
    ids = expand_placeholders(ids, images or [], videos or [], 2, family=family, video_timestamps=stamps,
                              encode=_encode)
    image_t = torch.tensor(images) if images else None
    video_t = torch.tensor(videos) if videos else None
    ours, delta = mrope_positions(ids, image_t, video_t, 2, family=family, second_per_grid_ts=seconds,
                                  tokens_per_second=TPS if family == "qwen2_5_vl" else None)
    input_ids = torch.tensor([ids])
    kinds = (input_ids == IDS.image_pad).int() + 2 * (input_ids == IDS.video_pad).int()
    # float32, as the processor's BatchFeature makes it
    extra = {} if seconds is None else {"second_per_grid_ts": torch.tensor(seconds)}
    ref, ref_delta = REF[family].get_rope_index(input_ids, mm_token_type_ids=kinds, image_grid_thw=image_t,
                                                video_grid_thw=video_t, **extra)
    assert ours.dtype == torch.long and ours.shape == (3, len(ids))
    assert torch.equal(ours, ref[:, 0]), (ours - ref[:, 0]).abs().max()
    assert delta == ref_delta.item()
    return ours, delta, ids


FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only(family):
    pos, delta, _ = _check(family)
    assert delta == 0 and torch.equal(pos[0], torch.arange(pos.shape[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_image(family):
    _, delta, _ = _check(family, images=[[1, 8, 12]])
    assert delta == 6 - 24  # the image's 24 tokens advance the position by max(4, 6) only


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_of_different_sizes(family):
    _check(family, images=[[1, 8, 12], [1, 22, 4]])


def test_video_qwen2_5_scales_time():
    # 0.0833 s per step (24 fps frames) and 1.0 s per step (2 fps); the second one's time positions
    # run past its spatial extent
    pos, delta, ids = _check("qwen2_5_vl", videos=[[13, 4, 6], [20, 4, 4]], seconds=[2 / 24, 1.0])
    video_end = max(i for i, t in enumerate(ids) if t == IDS.video_pad)
    start = pos[1, video_end].item() - 1  # its h row is start + h' - 1 with h' = 2
    assert pos[0, video_end].item() == start + int(19 * TPS * 1.0)
    # transformers 5.23 resumes the text at start + max(h', w'), below the video's last time
    # position (the original Qwen code resumed after the maximum); decode follows the maximum
    assert pos[0, video_end + 1].item() == start + 2
    assert pos.shape[1] + delta == pos.max().item() + 1


def test_video_qwen2_5_without_seconds_uses_one():
    _check("qwen2_5_vl", videos=[[3, 4, 4]])


def test_mixed_image_and_video_qwen2_5():
    _check("qwen2_5_vl", images=[[1, 6, 10], [1, 4, 4]], videos=[[4, 6, 8]], seconds=[0.5])


@pytest.mark.parametrize("grids", [[[3, 4, 6]], [[2, 8, 4], [5, 4, 4]]])
def test_video_qwen3_timestamped_frames(grids):
    stamps = [[0.25 + i for i in range(t)] for t, _, _ in grids]
    _check("qwen3_vl", images=[[1, 6, 10]], videos=grids, stamps=stamps)


def test_decode_positions_continue_from_delta():
    pos, delta, _ = _check("qwen2_5_vl", images=[[1, 8, 12]])
    nxt = decode_positions(pos.shape[1], 3, delta)
    assert nxt.shape == (3, 3) and nxt[0, 0].item() == pos.max().item() + 1
    assert torch.equal(nxt[0], nxt[2])


def test_mismatched_grids_are_refused():
    ids = expand_placeholders(_prompt(2, 0), [[1, 4, 4], [1, 4, 8]], [], 2, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="2 image placeholder run.*1 image grid"):
        mrope_positions(ids, [[1, 4, 4]], None, 2, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="run 1 has 8 tokens"):
        mrope_positions(ids, [[1, 4, 4], [1, 4, 4]], None, 2, family="qwen2_5_vl")
    vid = expand_placeholders(_prompt(0, 1), [], [[2, 4, 4]], 2, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="tokens_per_second"):
        mrope_positions(vid, None, [[2, 4, 4]], 2, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="non-empty"):
        mrope_positions([], None, None, 2, family="qwen3_vl")
