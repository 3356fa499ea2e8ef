"""Video files are bounded before any work: frame count and size from the header, a deadline,
frames resized as they decode (bit-equal to resizing after), and a proxy grid that needs no pixels."""
from __future__ import annotations

import io
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_pd.model import video
from qwenvl_pd.model.grid import smart_resize
from qwenvl_pd.model.processor import patchify, resize_normalize
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.model.video import VideoLimits, decode_clip, process_videos
from qwenvl_pd.model.video_plan import probe_clip, qwen2_5_frame_indices, qwen3_frame_indices, smart_resize_video
from qwenvl_pd.proxy.prompt.inputs import _video_grid
from qwenvl_pd.proxy.prompt.media import MediaLimits

CFG25 = VisionPreprocessConfig()
# a total budget small enough that Qwen3-VL's frame size depends on the frame count
CFG3 = VisionPreprocessConfig(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                              video_min_pixels=4096, video_max_pixels=6 * 32 * 64)
CFGS = {"qwen2_5_vl": CFG25, "qwen3_vl": CFG3}
W, H, N = 96, 64, 30


def _write(path, codec, pix_fmt, options=None):
    rng = np.random.default_rng(7)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for _ in range(N):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def _truncated(path) -> bytes:
    """The header (moov first) still declares 30 frames, but only the first 20 packets remain."""
    data = _write(path, "png", "rgb24", {"movflags": "faststart"})
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[19]
    return data[:pos + size]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"png.mp4": _write(d / "a.mp4", "png", "rgb24"),  # lossless, with a frame count
            "mpeg4.mp4": _write(d / "b.mp4", "mpeg4", "yuv420p"),  # lossy
            "ffv1.mkv": _write(d / "c.mkv", "ffv1", "bgr0"),  # MKV declares no frame count
            "cut.mp4": _truncated(d / "d.mp4")}


def _old_way(data: bytes, family: str):
    """What process_videos did before: decode every frame at full size, then resize the picks."""
    cfg = CFGS[family]
    with av.open(io.BytesIO(data)) as c:
        declared, rate = c.streams.video[0].frames, float(c.streams.video[0].average_rate)
        frames = [Image.fromarray(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    sampler = qwen3_frame_indices if family == "qwen3_vl" else qwen2_5_frame_indices
    picks = [i for i in sampler(declared or len(frames), rate, cfg) if i < len(frames)]
    if family == "qwen3_vl":
        h, w = smart_resize_video(len(picks), H, W, 2, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)
    else:
        h, w = smart_resize(H, W, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)
    return patchify(np.stack([resize_normalize(frames[i], h, w, cfg) for i in picks]), cfg), picks, (h, w)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", ["png.mp4", "mpeg4.mp4", "ffv1.mkv", "cut.mp4"])
def test_resizing_while_decoding_equals_resizing_after(files, name, family):
    (pixels, grid), picks, size = _old_way(files[name], family)
    clip = decode_clip(files[name], CFGS[family], family, resize=True)
    assert list(clip.indices) == picks and clip.size == size
    assert {f.size for f in clip.frames} == {(size[1], size[0])}  # only model-size frames were held
    ours = process_videos([files[name]], CFGS[family], family)
    assert torch.equal(ours.pixel_values_videos, pixels)
    assert ours.video_grid_thw.tolist() == [list(grid)]


def test_a_header_that_overstates_the_frames_is_planned_from_its_packets(files):
    plan = probe_clip(files["cut.mp4"], CFG3, "qwen3_vl")
    # the sampler picks 6 of the declared 30 frames (0, 6, 12, 17, 23, 29); the 20 packets hold 4
    assert plan.indices == (0, 6, 12, 17)
    assert (plan.total_frames, plan.fps, plan.width, plan.height) == (30, 10.0, W, H)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", ["png.mp4", "mpeg4.mp4", "ffv1.mkv", "cut.mp4"])
def test_proxy_grid_equals_prefill_grid(files, name, family):
    model = SimpleNamespace(vision=CFGS[family], family=family)
    grid, per_grid_t, stamps = _video_grid(files[name], model, MediaLimits())
    ours = process_videos([files[name]], CFGS[family], family)
    assert [list(grid)] == ours.video_grid_thw.tolist()
    if family == "qwen3_vl":
        assert per_grid_t is None and (stamps,) == ours.timestamps
    else:
        assert stamps == () and (per_grid_t,) == ours.second_per_grid_ts


def test_frames_over_the_pixel_cap_are_refused_before_any_decoding(files):
    # a zero deadline fails at the first packet or frame read, so only a header check can answer
    limits = VideoLimits(max_frame_pixels=W * H - 1, timeout_s=0)
    msg = "video frames are 96x64 = 6144 pixels; the limit is 6143 per frame"
    with pytest.raises(ValueError, match=msg):
        process_videos([files["png.mp4"]], CFG25, "qwen2_5_vl", limits=limits)
    with pytest.raises(ValueError, match=msg):
        probe_clip(files["ffv1.mkv"], CFG3, "qwen3_vl", limits)
    at_the_cap = probe_clip(files["png.mp4"], CFG25, "qwen2_5_vl", VideoLimits(max_frame_pixels=W * H))
    assert at_the_cap.indices == (0, 5, 10, 15, 20, 25)


def test_too_long_a_source_is_refused(files):
    with pytest.raises(ValueError, match="the video declares 30 frames; the limit is 29"):
        process_videos([files["png.mp4"]], CFG25, "qwen2_5_vl", limits=VideoLimits(29, timeout_s=0))
    with pytest.raises(ValueError, match="the video has more than 29 frames; the limit is 29"):
        probe_clip(files["ffv1.mkv"], CFG25, "qwen2_5_vl", VideoLimits(29))
    assert probe_clip(files["ffv1.mkv"], CFG25, "qwen2_5_vl", VideoLimits(30)).total_frames == 30


def test_decoding_past_the_deadline_stops(files):
    with pytest.raises(ValueError, match=r"^decoding the video took longer than 0 s$"):
        process_videos([files["png.mp4"]], CFG3, "qwen3_vl", limits=VideoLimits(timeout_s=0))
    with pytest.raises(ValueError, match=r"^decoding the video took longer than 0 s$"):
        probe_clip(files["ffv1.mkv"], CFG3, "qwen3_vl", VideoLimits(timeout_s=0))  # while counting
    assert decode_clip(files["png.mp4"], CFG3, "qwen3_vl", VideoLimits(timeout_s=60)).indices[-1] == 29


def test_qwen3_decodes_again_at_the_right_size_when_frames_go_missing(files, monkeypatch):
    """A decoder that ends early can change Qwen3-VL's size: the kept frames are decoded again."""
    real = video.decode_frames
    calls = []

    def ends_before_frame_23(container, info, wanted, keep, deadline):
        calls.append(sorted(wanted))
        got = real(container, info, wanted, keep, deadline)
        return {i: f for i, f in got.items() if len(calls) > 1 or i < 23}
    monkeypatch.setattr(video, "decode_frames", ends_before_frame_23)
    ours = process_videos([files["png.mp4"]], CFG3, "qwen3_vl")
    assert calls == [[0, 6, 12, 17, 23, 29], [0, 6, 12, 17]]
    with av.open(io.BytesIO(files["png.mp4"])) as c:
        frames = [Image.fromarray(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    h, w = smart_resize_video(4, H, W, 2, 32, CFG3.video_min_pixels, CFG3.video_max_pixels)
    assert (h, w) == (32, 64)  # the 6 planned frames would be 32 x 32
    want, grid = patchify(np.stack([resize_normalize(frames[i], h, w, CFG3) for i in calls[1]]), CFG3)
    assert torch.equal(ours.pixel_values_videos, want) and ours.video_grid_thw.tolist() == [list(grid)]
