"""Video preprocessing for Qwen2.5-VL and Qwen3-VL: frame sampling, resize, patches, time info.

Sampling and sizes follow transformers' Qwen2VLVideoProcessor / Qwen3VLVideoProcessor; frames are
resized with PIL bicubic like images (transformers resizes videos with torchvision, which we do
not depend on). Decoding uses PyAV, as transformers' "pyav" backend does.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image

from qwenvl_pd.model.processor import (
    VisionPreprocessConfig,
    check_aspect_ratio,
    load_image,
    normalize_family,
    patchify,
    resize_normalize,
    smart_resize,
)

# transformers' VideoMetadata.sampled_fps falls back to this when frames come without a rate
DEFAULT_SOURCE_FPS = 24.0

FrameLike = Union[Image.Image, np.ndarray]
VideoLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Sequence[FrameLike]]


@dataclass(frozen=True, eq=False)
class VideoInputs:
    pixel_values_videos: torch.Tensor  # [sum(t*h*w), C*T*P*P] float32
    video_grid_thw: torch.Tensor  # [num_videos, 3] long
    second_per_grid_ts: tuple[float, ...] | None  # Qwen2.5-VL: seconds per temporal grid step, per video
    timestamps: tuple[tuple[float, ...], ...] | None  # Qwen3-VL: seconds of each temporal step, per video


@dataclass(frozen=True)
class Clip:
    frames: tuple[Image.Image, ...]  # sampled frames, RGB
    indices: tuple[int, ...]  # their positions in the source
    total_frames: int  # frames in the source
    fps: float  # source frame rate


def qwen2_5_frame_indices(total: int, fps: float, cfg: VisionPreprocessConfig) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames with fps=cfg.fps: uniform, a multiple of T frames."""
    tp = cfg.temporal_patch_size
    max_frames = math.floor(min(cfg.max_frames, total) / tp) * tp
    n = min(max(total / fps * cfg.fps, cfg.min_frames), max_frames, total)
    n = math.floor(n / tp) * tp
    if n <= 0:  # shorter than one temporal patch (transformers divides by zero): keep every frame
        return list(range(total))
    return torch.arange(0, total, total / n).int().tolist()


def qwen3_frame_indices(total: int, fps: float, cfg: VisionPreprocessConfig) -> list[int]:
    """Qwen3VLVideoProcessor.sample_frames: cfg.fps frames a second within [min_frames, max_frames]."""
    n = int(total / fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def grid_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Seconds of each temporal grid step: the mean time of its first and last frame (Qwen3-VL)."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    secs = [i / fps for i in idx]
    tp = temporal_patch_size
    return tuple((secs[i] + secs[i + tp - 1]) / 2 for i in range(0, len(secs), tp))


def _sampler(family: str):
    return qwen3_frame_indices if family == "qwen3_vl" else qwen2_5_frame_indices


def _stream_info(container) -> tuple[int, float]:
    if not container.streams.video:
        raise ValueError("the container has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    total = stream.frames or sum(1 for _ in container.decode(video=0))  # some containers omit the count
    if total <= 0:
        raise ValueError("the video has no frames")
    return int(total), float(rate)


def _decode_frames(container, wanted: set[int]) -> dict[int, Image.Image]:
    got: dict[int, Image.Image] = {}
    container.seek(0)
    for i, frame in enumerate(container.decode(video=0)):
        if i > max(wanted):
            break
        if i in wanted:
            got[i] = Image.fromarray(frame.to_ndarray(format="rgb24"))
    return got


def decode_clip(src, cfg: VisionPreprocessConfig, family: str) -> Clip:
    """Video file path or bytes -> the frames the family's sampler picks."""
    import av  # imported lazily: image-only deployments never load FFmpeg

    is_bytes = isinstance(src, (bytes, bytearray, memoryview))
    try:
        with av.open(io.BytesIO(bytes(src)) if is_bytes else os.fspath(src)) as container:
            total, fps = _stream_info(container)
            indices = _sampler(family)(total, fps, cfg)
            got = _decode_frames(container, set(indices))
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"could not decode video: {e}") from None
    # a frame count from the header can overstate what decodes; keep the frames that exist
    indices = [i for i in indices if i in got]
    if not indices:
        raise ValueError("no frame of the video could be decoded")
    return Clip(tuple(got[i] for i in indices), tuple(indices), total, fps)


def frames_clip(frames: Sequence[FrameLike], cfg: VisionPreprocessConfig, family: str,
                fps: float | None) -> Clip:
    """Frames given by the caller: Qwen2.5-VL uses them all, Qwen3-VL samples them by fps."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    rgb = [load_image(f) for f in frames]
    fps = float(fps) if fps else DEFAULT_SOURCE_FPS
    indices = qwen3_frame_indices(len(rgb), fps, cfg) if family == "qwen3_vl" else list(range(len(rgb)))
    return Clip(tuple(rgb[i] for i in indices), tuple(indices), len(rgb), fps)


def load_clip(video: VideoLike, cfg: VisionPreprocessConfig, family: str, fps: float | None = None) -> Clip:
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        return decode_clip(video, cfg, family)
    if isinstance(video, np.ndarray) and video.ndim == 4:
        video = list(video)  # [N, H, W, C] array of frames
    if not isinstance(video, Sequence):
        raise ValueError(f"unsupported video input {type(video).__name__}: expected a path, bytes or frames")
    return frames_clip(video, cfg, family, fps)


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's resize: the pixel budget covers all frames together, not each frame."""
    if num_frames < temporal_factor:
        raise ValueError(f"video has {num_frames} frame(s) after sampling; Qwen3-VL needs at least "
                         f"{temporal_factor}")
    if height <= 0 or width <= 0:
        raise ValueError(f"video frames are empty: {width}x{height} pixels (width x height)")
    if height < factor or width < factor:  # tiny frames are scaled up before the budget applies
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def clip_size(clip: Clip, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int]:
    sizes = {f.size for f in clip.frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
    (width, height), = sizes
    if family == "qwen3_vl":
        return smart_resize_video(len(clip.frames), height, width, cfg.temporal_patch_size, cfg.factor,
                                  cfg.video_min_pixels, cfg.video_max_pixels)
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)


def process_clip(clip: Clip, cfg: VisionPreprocessConfig, family: str):
    """Clip -> (patches [gt*gh*gw, C*T*P*P], grid (gt, gh, gw))."""
    h, w = clip_size(clip, cfg, family)
    return patchify(np.stack([resize_normalize(f, h, w, cfg) for f in clip.frames]), cfg)


def _time_info(clip: Clip, cfg: VisionPreprocessConfig, family: str):
    tp = cfg.temporal_patch_size
    if family == "qwen3_vl":
        return grid_timestamps(clip.indices, clip.fps, tp)
    # VideoMetadata.sampled_fps: the rate of the frames kept; each grid step spans T of them
    return tp / (len(clip.indices) / clip.total_frames * clip.fps)


def process_videos(videos: Sequence[VideoLike], cfg: VisionPreprocessConfig, family: str,
                   fps: float | Sequence[float | None] | None = None) -> VideoInputs:
    """Videos (paths, bytes or frame lists) -> pixel_values_videos, video_grid_thw and time info.

    fps is the frame rate of caller-given frames (one for all or one per video); files carry
    their own. Unknown rates default to 24, as transformers does.
    """
    fam = normalize_family(family)
    if not videos:
        raise ValueError("process_videos needs at least one video")
    rates = list(fps) if isinstance(fps, Sequence) else [fps] * len(videos)
    if len(rates) != len(videos):
        raise ValueError(f"got {len(rates)} fps values for {len(videos)} videos")
    clips = [load_clip(v, cfg, fam, r) for v, r in zip(videos, rates)]
    done = [process_clip(c, cfg, fam) for c in clips]
    times = tuple(_time_info(c, cfg, fam) for c in clips)
    return VideoInputs(
        pixel_values_videos=torch.cat([p for p, _ in done]),
        video_grid_thw=torch.tensor([g for _, g in done], dtype=torch.long),
        second_per_grid_ts=None if fam == "qwen3_vl" else times,
        timestamps=times if fam == "qwen3_vl" else None,
    )
