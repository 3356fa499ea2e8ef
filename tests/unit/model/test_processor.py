"""Vision preprocessing equals transformers 5.23 exactly.

Images: against transformers' PIL backend (Qwen2VLImageProcessorPil), Qwen2.5-VL (patch 14, CLIP
mean/std) and Qwen3-VL (patch 16, mean/std 0.5) settings. Videos: transformers' video processors
need torchvision (not installable here), so the reference is assembled from transformers' own
pieces that do not: frame samplers, PyAV reader, Qwen3-VL video smart_resize and patchify, the
PIL image pipeline for each frame, and the processors' timestamp / second_per_grid_ts code.
Placeholder text comes from the processors' own replace_*_token methods.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import sys
import types
from functools import partial
from types import SimpleNamespace
from unittest import mock

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata, read_video_pyav

from qwenvl_pd.model.grid import VisionTokenIds, expand_placeholders, image_grid, smart_resize
from qwenvl_pd.model.processor import process_images
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.model.video import load_clip, process_videos
from qwenvl_pd.model.video_plan import grid_timestamps

# the attribute route through the lazy package hands out a torchvision-needing dummy
q3video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")

QWEN25_JSON = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711],
               "image_processor_type": "Qwen2VLImageProcessor"}
QWEN3_JSON = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
              "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5]}
QWEN3_VIDEO_JSON = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "fps": 2, "min_frames": 4, "max_frames": 768}
IDS = VisionTokenIds()
SPECIAL = {"<|vision_start|>": IDS.vision_start, "<|vision_end|>": IDS.vision_end,
           "<|image_pad|>": IDS.image_pad, "<|video_pad|>": IDS.video_pad}


def _write(tmp_path, name, data):
    (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return tmp_path


@pytest.fixture(scope="module")
def cfg25(tmp_path_factory):
    return VisionPreprocessConfig.from_dir(_write(tmp_path_factory.mktemp("q25"), "preprocessor_config.json",
                                                  QWEN25_JSON))


@pytest.fixture(scope="module")
def cfg3(tmp_path_factory):
    d = _write(tmp_path_factory.mktemp("q3"), "preprocessor_config.json", QWEN3_JSON)
    return VisionPreprocessConfig.from_dir(_write(d, "video_preprocessor_config.json", QWEN3_VIDEO_JSON))


def _hf_image_processor(cfg):
    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                    patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                                    temporal_patch_size=cfg.temporal_patch_size,
                                    image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def _rand_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + h * 7 + w)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _assert_same(ours_pixels, ours_grid, ref):
    assert torch.equal(ours_grid, torch.as_tensor(ref["image_grid_thw"]))
    ref_pixels = torch.as_tensor(ref["pixel_values"])
    assert ours_pixels.dtype == torch.float32 and ours_pixels.shape == ref_pixels.shape
    assert (ours_pixels - ref_pixels).abs().max().item() == 0


# ---------------------------------------------------------------- config


def test_config_qwen2_5_format(cfg25):
    assert (cfg25.patch_size, cfg25.merge_size, cfg25.temporal_patch_size) == (14, 2, 2)
    assert (cfg25.min_pixels, cfg25.max_pixels) == (3136, 12845056)
    assert cfg25.image_mean == tuple(QWEN25_JSON["image_mean"])
    # no video file: transformers builds the video processor from preprocessor_config.json
    assert (cfg25.video_min_pixels, cfg25.video_max_pixels) == (3136, 12845056)
    assert (cfg25.fps, cfg25.min_frames, cfg25.max_frames) == (2.0, 4, 768)


def test_config_qwen3_format(cfg3):
    assert (cfg3.patch_size, cfg3.factor, cfg3.min_pixels, cfg3.max_pixels) == (16, 32, 65536, 16777216)
    assert (cfg3.video_min_pixels, cfg3.video_max_pixels) == (4096, 25165824)
    assert (cfg3.fps, cfg3.min_frames, cfg3.max_frames, cfg3.image_std) == (2.0, 4, 768, (0.5, 0.5, 0.5))


@pytest.mark.parametrize("name, data, words", [
    (None, None, ["preprocessor_config.json", "not found"]),
    ("preprocessor_config.json", "{nope", ["preprocessor_config.json", "JSON"]),
    ("preprocessor_config.json", {**QWEN25_JSON, "patch_size": 0},
     ["preprocessor_config.json", "'patch_size'"]),
    ("preprocessor_config.json", {**QWEN25_JSON, "max_pixels": "big"}, ["'max_pixels'"]),
    ("preprocessor_config.json", {**QWEN3_JSON, "size": {"shortest_edge": -1}}, ["'size.shortest_edge'"]),
    ("preprocessor_config.json", {**QWEN25_JSON, "image_std": [0.5, 0, 0.5]}, ["'image_std'"]),
    ("preprocessor_config.json", {**QWEN25_JSON, "min_pixels": 10**9}, ["max pixels", "min pixels"]),
    ("video_preprocessor_config.json", {**QWEN3_VIDEO_JSON, "fps": -2},
     ["video_preprocessor_config.json", "'fps'"]),
    ("video_preprocessor_config.json", {**QWEN3_VIDEO_JSON, "patch_size": 14}, ["'patch_size'", "differs"]),
])
def test_config_errors_name_file_and_key(tmp_path, name, data, words):
    if name == "video_preprocessor_config.json":
        _write(tmp_path, "preprocessor_config.json", QWEN3_JSON)
    if name is not None:
        _write(tmp_path, name, data)
    with pytest.raises(ValueError) as err:
        VisionPreprocessConfig.from_dir(tmp_path)
    assert all(w in str(err.value) for w in words), str(err.value)


# ---------------------------------------------------------------- images


SIZES = [(224, 224), (28, 1000), (1500, 40), (10, 10), (333, 517), (480, 640), (57, 3)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_images_match_transformers(family, cfg25, cfg3):
    cfg = cfg25 if family == "qwen2_5_vl" else cfg3
    images = [_rand_image(h, w) for h, w in SIZES]
    ours = process_images(images, cfg)
    _assert_same(ours.pixel_values, ours.image_grid_thw, _hf_image_processor(cfg)(images))
    for (h, w), grid in zip(SIZES, ours.image_grid_thw.tolist()):
        assert tuple(grid) == image_grid(h, w, cfg)
    # 10x10 is scaled up to min_pixels: 56x56 (patch 14) or 256x256 (patch 16)
    assert tuple(ours.image_grid_thw[3].tolist()) == ((1, 4, 4) if family == "qwen2_5_vl" else (1, 16, 16))


def test_image_above_max_pixels_is_scaled_down():
    cfg = VisionPreprocessConfig(min_pixels=3136, max_pixels=100_000)
    img = _rand_image(600, 800)
    ours = process_images([img], cfg)
    _assert_same(ours.pixel_values, ours.image_grid_thw, _hf_image_processor(cfg)([img]))
    t, h, w = ours.image_grid_thw[0].tolist()
    assert h * w * 14 * 14 <= 100_000 and (h, w) == (18, 26)


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P"])
def test_alpha_and_gray_inputs_match_transformers(mode, cfg3):
    img = _rand_image(90, 130, "RGBA" if mode == "P" else mode)
    if mode == "P":
        img = img.convert("RGB").convert("P")
        img.info["transparency"] = 3
    ours = process_images([img], cfg3)
    _assert_same(ours.pixel_values, ours.image_grid_thw, _hf_image_processor(cfg3)([img]))


def test_encoded_bytes_and_arrays_match_pil_input(cfg25):
    img = _rand_image(100, 150, "RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ref = _hf_image_processor(cfg25)([img])
    for src in (buf.getvalue(), bytearray(buf.getvalue()), np.asarray(img)):
        ours = process_images([src], cfg25)
        _assert_same(ours.pixel_values, ours.image_grid_thw, ref)


def test_exif_rotation_is_applied_like_load_image(cfg25):
    import base64

    from transformers.image_utils import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    _rand_image(60, 100).save(buf, format="JPEG", exif=exif)
    ours = process_images([buf.getvalue()], cfg25)
    ref_img = load_image(base64.b64encode(buf.getvalue()).decode())
    assert ref_img.size == (60, 100)  # stored 100 wide, shown 60 wide
    _assert_same(ours.pixel_values, ours.image_grid_thw, _hf_image_processor(cfg25)([ref_img]))


def test_bad_images_are_refused(cfg25):
    with pytest.raises(ValueError, match="aspect ratio"):
        process_images([_rand_image(10, 2500)], cfg25)
    with pytest.raises(ValueError, match="aspect ratio"):  # transformers refuses it the same way
        _hf_image_processor(cfg25)([_rand_image(10, 2500)])
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 10, 28, 3136, 10**6)
    with pytest.raises(ValueError, match="not a decodable image"):
        process_images([b"<html>not an image</html>"], cfg25)
    buf = io.BytesIO()
    _rand_image(64, 64).save(buf, format="PNG")
    with pytest.raises(ValueError, match="not a decodable image"):
        process_images([buf.getvalue()[:200]], cfg25)  # truncated
    with pytest.raises(ValueError, match="at least one"):
        process_images([], cfg25)


# ---------------------------------------------------------------- placeholders


def _tokenize(text: str) -> list[int]:
    """Stand-in tokenizer: special tokens by id, any other text one id per character."""
    out: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
        out += [SPECIAL[part]] if part in SPECIAL else [ord(c) for c in part]
    return out


def _hf_expand(processor_cls, fake_self, text, images_inputs=None, videos_inputs=None, n_img=0, n_vid=0):
    img_rep = [processor_cls.replace_image_token(fake_self, images_inputs, i) for i in range(n_img)]
    vid_rep = [processor_cls.replace_video_token(fake_self, videos_inputs, i) for i in range(n_vid)]
    fake_self.all_special_multimodal_tokens = ["<|image_pad|>", "<|video_pad|>"]
    [expanded], _ = ProcessorMixin.get_text_with_replacements(fake_self, [text], img_rep, vid_rep)
    return _tokenize(expanded)


PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a<|vision_start|><|video_pad|>"
          "<|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>")


def _fake_processor(temporal=2):
    merge = SimpleNamespace(merge_size=2, temporal_patch_size=temporal)
    return SimpleNamespace(image_processor=merge, video_processor=merge, image_token="<|image_pad|>",
                           video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                           vision_end_token="<|vision_end|>",
                           _calculate_timestamps=partial(Qwen3VLProcessor._calculate_timestamps, None))


def test_expand_qwen2_5_matches_transformers():
    images, videos = torch.tensor([[1, 4, 6], [1, 10, 2]]), torch.tensor([[3, 4, 4]])
    ref = _hf_expand(Qwen2_5_VLProcessor, _fake_processor(), PROMPT, {"image_grid_thw": images},
                     {"video_grid_thw": videos}, 2, 1)
    ours = expand_placeholders(_tokenize(PROMPT), images, videos, 2, family="qwen2_5_vl")
    assert ours == ref and ours.count(IDS.image_pad) == 6 + 5 and ours.count(IDS.video_pad) == 12


def test_expand_qwen3_matches_transformers():
    images, videos = torch.tensor([[1, 4, 6], [1, 10, 2]]), torch.tensor([[3, 4, 4]])
    indices, fps = [0, 12, 24, 36, 49], 24.0  # 5 frames: padded to 6, 3 grid steps
    meta = VideoMetadata(total_num_frames=50, fps=fps, frames_indices=list(indices))
    ref = _hf_expand(Qwen3VLProcessor, _fake_processor(), PROMPT, {"image_grid_thw": images},
                     {"video_grid_thw": videos, "video_metadata": [meta]}, 2, 1)
    stamps = [grid_timestamps(indices, fps, 2)]
    assert list(stamps[0]) == Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
    ours = expand_placeholders(_tokenize(PROMPT), images, videos, 2, family="qwen3_vl_moe",
                               video_timestamps=stamps, encode=_tokenize)
    assert ours == ref and ours.count(IDS.vision_start) == 3 + 3


def test_expand_count_mismatch_is_refused():
    ids = _tokenize(PROMPT)
    with pytest.raises(ValueError, match="2 image placeholder.*but 1 image"):
        expand_placeholders(ids, [[1, 4, 4]], [[2, 4, 4]], family="qwen2_5_vl")
    with pytest.raises(ValueError, match="1 video placeholder.*but 0 video"):
        expand_placeholders(ids, [[1, 4, 4]] * 2, [], family="qwen2_5_vl")
    with pytest.raises(ValueError, match="timestamps"):
        expand_placeholders(ids, [[1, 4, 4]] * 2, [[2, 4, 4]], family="qwen3_vl")


# ---------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def qwen2vl_video_module():
    """transformers' Qwen2VL video module imports torchvision at the top but its sampler and
    patchify are plain torch: import it once under a throwaway torchvision stub."""
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cache the real answer before the stub exists
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    stubs = {n: types.ModuleType(n) for n in names}
    for parent, child in zip(names, names[1:]):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    with mock.patch.dict(sys.modules, stubs):
        sys.modules.pop("transformers.models.qwen2_vl.video_processing_qwen2_vl", None)
        return importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")


def _hf_sampler(module, cls_name, **attrs):
    proc = object.__new__(getattr(module, cls_name))
    for k, v in {"num_frames": None, "fps": None, **attrs}.items():
        setattr(proc, k, v)
    return proc


def _hf_video_pixels(frames, h, w, cfg):
    """transformers' PIL image pipeline per frame, then transformers' video patchify."""
    ip = _hf_image_processor(cfg)
    out = []
    for f in frames:
        chw = np.moveaxis(np.asarray(f.convert("RGB")), -1, 0)
        chw = PilBackend.resize(ip, chw, SizeDict(height=h, width=w), PILImageResampling.BICUBIC)
        out.append(ip.normalize(ip.rescale(chw, 1 / 255), list(cfg.image_mean), list(cfg.image_std)))
    video = torch.from_numpy(np.stack(out))[None]
    patches, t, gh, gw = q3video.Qwen3VLVideoProcessor.patchify(None, video, cfg.patch_size, cfg.merge_size,
                                                                cfg.temporal_patch_size)
    return patches[0], torch.tensor([[t, gh, gw]])


def _frames(n, h, w, seed=0):
    return [_rand_image(h, w, seed=seed + i) for i in range(n)]


def test_video_frames_qwen3_match_transformers(cfg3):
    frames = _frames(10, 60, 90)
    ours = process_videos([frames], cfg3, "qwen3_vl")
    proc = _hf_sampler(q3video, "Qwen3VLVideoProcessor", fps=cfg3.fps)
    meta = VideoMetadata(total_num_frames=10, fps=None)
    indices = proc.sample_frames(meta).tolist()  # no rate given: transformers assumes 24
    h, w = q3video.smart_resize(len(indices), 60, 90, 2, 32, cfg3.video_min_pixels, cfg3.video_max_pixels)
    ref_pixels, ref_grid = _hf_video_pixels([frames[i] for i in indices], h, w, cfg3)
    assert torch.equal(ours.video_grid_thw, ref_grid)
    assert (ours.pixel_values_videos - ref_pixels).abs().max().item() == 0
    ref_stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, meta.fps, 2)
    assert ours.timestamps == (tuple(ref_stamps),) and ours.second_per_grid_ts is None


def test_video_frames_qwen2_5_match_transformers(cfg25, qwen2vl_video_module):
    frames = _frames(5, 50, 70)  # odd count: the last frame is repeated to fill the temporal patch
    ours = process_videos([frames, frames[:2]], cfg25, "qwen2_5_vl", fps=[None, 4.0])
    h, w = qwen2vl_video_module.smart_resize(50, 70, 28, cfg25.video_min_pixels, cfg25.video_max_pixels)
    ref_a, grid_a = _hf_video_pixels(frames, h, w, cfg25)
    ref_b, grid_b = _hf_video_pixels(frames[:2], h, w, cfg25)
    assert torch.equal(ours.video_grid_thw, torch.cat([grid_a, grid_b]))
    assert (ours.pixel_values_videos - torch.cat([ref_a, ref_b])).abs().max().item() == 0
    # Qwen2_5_VLProcessor: temporal_patch_size / VideoMetadata.sampled_fps (24 when no rate is known)
    rates = [VideoMetadata(total_num_frames=n, fps=r, frames_indices=list(range(n))).sampled_fps
             for n, r in ((5, None), (2, 4.0))]
    assert ours.second_per_grid_ts == tuple(2 / r for r in rates) and ours.timestamps is None


def test_video_array_frames_equal_pil_frames(cfg3):
    frames = _frames(6, 40, 48)
    a = process_videos([frames], cfg3, "qwen3_vl", fps=3.0)
    b = process_videos([np.stack([np.asarray(f) for f in frames])], cfg3, "qwen3_vl", fps=[3.0])
    assert torch.equal(a.pixel_values_videos, b.pixel_values_videos) and a.timestamps == b.timestamps


def test_still_video_equals_image(cfg25):
    """Two identical frames are exactly an image (whose frame is repeated T times)."""
    img = _rand_image(120, 200)
    ours = process_videos([[img, img]], cfg25, "qwen2_5_vl")
    ref = _hf_image_processor(cfg25)([img])
    _assert_same(ours.pixel_values_videos, ours.video_grid_thw, ref)


def _write_video(path, codec, pix_fmt):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, pix_fmt
        for img in _frames(30, 64, 96, seed=5):
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """30 frames at 10 fps, lossless PNG in MP4, so decoded frames are exact."""
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", "png", "rgb24")


def test_video_file_qwen3_matches_transformers(video_file, cfg3):
    proc = _hf_sampler(q3video, "Qwen3VLVideoProcessor", fps=cfg3.fps)
    ref_frames, meta = read_video_pyav(str(video_file), sample_indices_fn=proc.sample_frames)
    clip = load_clip(str(video_file), cfg3, "qwen3_vl")
    assert list(clip.indices) == meta.frames_indices.tolist() and (clip.total_frames, clip.fps) == (30, 10.0)
    assert np.array_equal(np.stack([np.asarray(f) for f in clip.frames]), ref_frames)
    ours = process_videos([video_file.read_bytes()], cfg3, "qwen3_vl")
    ref_stamps = Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps, 2)
    assert ours.timestamps == (tuple(ref_stamps),)
    n = len(meta.frames_indices)
    h, w = q3video.smart_resize(n, 64, 96, 2, 32, cfg3.video_min_pixels, cfg3.video_max_pixels)
    ref_pixels, ref_grid = _hf_video_pixels([Image.fromarray(f) for f in ref_frames], h, w, cfg3)
    assert torch.equal(ours.video_grid_thw, ref_grid) and ref_grid[0, 0].item() == n // 2
    assert (ours.pixel_values_videos - ref_pixels).abs().max().item() == 0


def test_video_file_qwen2_5_matches_transformers(video_file, cfg25, qwen2vl_video_module):
    proc = _hf_sampler(qwen2vl_video_module, "Qwen2VLVideoProcessor")
    sample = partial(proc.sample_frames, temporal_patch_size=2, min_frames=4, max_frames=768, fps=cfg25.fps)
    ref_frames, meta = read_video_pyav(str(video_file), sample_indices_fn=sample)
    clip = load_clip(video_file, cfg25, "qwen2_5_vl")
    assert list(clip.indices) == meta.frames_indices.tolist()
    assert np.array_equal(np.stack([np.asarray(f) for f in clip.frames]), ref_frames)
    ours = process_videos([str(video_file)], cfg25, "qwen2_5_vl")
    assert ours.second_per_grid_ts == (2 / meta.sampled_fps,)


def test_bad_videos_are_refused(cfg3):
    with pytest.raises(ValueError, match="could not decode video"):
        process_videos([b"definitely not a video"], cfg3, "qwen3_vl")
    with pytest.raises(ValueError, match="one size"):
        process_videos([[_rand_image(40, 40), _rand_image(40, 50)]], cfg3, "qwen2_5_vl")
    with pytest.raises(ValueError, match="at least 2"):
        process_videos([_frames(1, 40, 40)], cfg3, "qwen3_vl")
    with pytest.raises(ValueError, match="family"):
        process_videos([_frames(2, 40, 40)], cfg3, "llava")


def test_video_without_frame_count_is_counted(video_file, cfg3, tmp_path):
    """MKV stores no frame count (transformers' reader then divides by zero): we count its packets."""
    mkv = _write_video(tmp_path / "clip.mkv", "ffv1", "bgr0")
    assert av.open(str(mkv)).streams.video[0].frames == 0
    a, b = load_clip(mkv, cfg3, "qwen3_vl"), load_clip(video_file, cfg3, "qwen3_vl")
    assert a.indices == b.indices and a.total_frames == 30
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames))
