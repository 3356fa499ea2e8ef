"""Video preprocessing for Qwen2.5-VL and Qwen3-VL: frame sampling, resize, patches, time info.

Sampling and sizes follow transformers' Qwen2VLVideoProcessor / Qwen3VLVideoProcessor; frames are
resized with PIL bicubic like images (transformers resizes videos with torchvision, which we do
not depend on). Decoding uses PyAV, as transformers' "pyav" backend does, within VideoLimits
(video_io.py); process_videos resizes each frame as it is decoded, so only model-size frames
are ever held.
"""

from __future__ import annotations

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
from qwenvl_pd.model.video_io import Deadline, StreamInfo, VideoLimits, decode_frames, open_video, stream_info

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
    size: tuple[int, int] | None = None  # (h, w) the frames were resized to while decoding


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


@dataclass(frozen=True)
class ClipPlan:
    """What a video file gives, known from its header and packets before any frame is decoded."""
    indices: tuple[int, ...]  # the sampler's picks that the file holds
    total_frames: int
    fps: float
    width: int  # of every frame, as decoded
    height: int


def _plan(container, cfg: VisionPreprocessConfig, family: str, limits: VideoLimits,
          deadline: Deadline) -> tuple[ClipPlan, StreamInfo]:
    info = stream_info(container, limits, deadline)
    # a header can overstate the frames: those past the last packet cannot decode, so both the
    # proxy (which only probes) and prefill (which decodes) leave them out
    indices = [i for i in _sampler(family)(info.total_frames, info.fps, cfg) if i < info.packets]
    return ClipPlan(tuple(indices), info.total_frames, info.fps, info.width, info.height), info


def probe_clip(src, cfg: VisionPreprocessConfig, family: str,
               limits: VideoLimits = VideoLimits()) -> ClipPlan:
    """Video file path or bytes -> the frames the family's sampler will take; decodes nothing."""
    with open_video(src) as container:
        return _plan(container, cfg, normalize_family(family), limits, Deadline(limits.timeout_s))[0]


def _resizer(size: tuple[int, int] | None):
    if size is None:
        return lambda img: img
    h, w = size
    # the same PIL call resize_normalize makes, so the pixels are those of resizing later
    return lambda img: img.resize((w, h), Image.Resampling.BICUBIC)


def _decode_planned(container, plan: ClipPlan, info: StreamInfo, cfg, family: str, resize: bool,
                    deadline: Deadline) -> tuple[list[int], dict, tuple[int, int] | None]:
    size = plan_size(plan, cfg, family) if resize else None
    got = decode_frames(container, info, set(plan.indices), _resizer(size), deadline)
    indices = [i for i in plan.indices if i in got]  # the decoder may still end early
    if not indices:
        raise ValueError("no frame of the video could be decoded")
    new = size and _target_size(len(indices), plan.height, plan.width, cfg, family)
    if new != size:  # Qwen3-VL's size depends on the frame count: decode the kept ones again
        got, size = decode_frames(container, info, set(indices), _resizer(new), deadline), new
    return indices, got, size


def decode_clip(src, cfg: VisionPreprocessConfig, family: str, limits: VideoLimits = VideoLimits(),
                resize: bool = False) -> Clip:
    """Video file path or bytes -> the frames the family's sampler picks.

    resize=True resizes each frame to the model's size as it is decoded (what process_videos
    uses: memory then holds only model-size frames); False keeps them as decoded."""
    family = normalize_family(family)
    deadline = Deadline(limits.timeout_s)
    with open_video(src) as container:
        plan, info = _plan(container, cfg, family, limits, deadline)
        indices, got, size = _decode_planned(container, plan, info, cfg, family, resize, deadline)
    return Clip(tuple(got[i] for i in indices), tuple(indices), plan.total_frames, plan.fps, size)


def frames_clip(frames: Sequence[FrameLike], cfg: VisionPreprocessConfig, family: str,
                fps: float | None) -> Clip:
    """Frames given by the caller: Qwen2.5-VL uses them all, Qwen3-VL samples them by fps."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    rgb = [load_image(f) for f in frames]
    fps = float(fps) if fps else DEFAULT_SOURCE_FPS
    indices = qwen3_frame_indices(len(rgb), fps, cfg) if family == "qwen3_vl" else list(range(len(rgb)))
    return Clip(tuple(rgb[i] for i in indices), tuple(indices), len(rgb), fps)


def load_clip(video: VideoLike, cfg: VisionPreprocessConfig, family: str, fps: float | None = None,
              limits: VideoLimits = VideoLimits(), resize: bool = False) -> Clip:
    """A file (bounded by limits; resized while decoding if asked) or caller-given frames -> Clip."""
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        return decode_clip(video, cfg, family, limits, resize)
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


def _target_size(num_frames: int, height: int, width: int, cfg: VisionPreprocessConfig,
                 family: str) -> tuple[int, int]:
    if family == "qwen3_vl":
        return smart_resize_video(num_frames, height, width, cfg.temporal_patch_size, cfg.factor,
                                  cfg.video_min_pixels, cfg.video_max_pixels)
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)


def clip_size(clip: Clip, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int]:
    if clip.size is not None:
        return clip.size
    sizes = {f.size for f in clip.frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
    (width, height), = sizes
    return _target_size(len(clip.frames), height, width, cfg, family)


def plan_size(plan: ClipPlan, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int]:
    """(h, w) the planned frames are resized to: clip_size of the clip decoding would give."""
    return _target_size(len(plan.indices), plan.height, plan.width, cfg, normalize_family(family))


def plan_grid(plan: ClipPlan, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int, int]:
    """grid_thw that process_videos gives the decoded clip, from the plan alone."""
    h, w = plan_size(plan, cfg, family)
    p = cfg.patch_size
    return math.ceil(len(plan.indices) / cfg.temporal_patch_size), h // p, w // p


def process_clip(clip: Clip, cfg: VisionPreprocessConfig, family: str):
    """Clip -> (patches [gt*gh*gw, C*T*P*P], grid (gt, gh, gw))."""
    h, w = clip_size(clip, cfg, family)
    # frames resized while decoding are already (h, w): PIL's resize to the same size is a copy
    return patchify(np.stack([resize_normalize(f, h, w, cfg) for f in clip.frames]), cfg)


def time_info(clip: Clip | ClipPlan, cfg: VisionPreprocessConfig, family: str):
    """Qwen3-VL: seconds of each grid step; Qwen2.5-VL: seconds per grid step."""
    tp = cfg.temporal_patch_size
    if normalize_family(family) == "qwen3_vl":
        return grid_timestamps(clip.indices, clip.fps, tp)
    # VideoMetadata.sampled_fps: the rate of the frames kept; each grid step spans T of them
    return tp / (len(clip.indices) / clip.total_frames * clip.fps)


def process_videos(videos: Sequence[VideoLike], cfg: VisionPreprocessConfig, family: str,
                   fps: float | Sequence[float | None] | None = None,
                   limits: VideoLimits = VideoLimits()) -> VideoInputs:
    """Videos (paths, bytes or frame lists) -> pixel_values_videos, video_grid_thw and time info.

    fps is the frame rate of caller-given frames (one for all or one per video); files carry
    their own. Unknown rates default to 24, as transformers does. Files are refused past limits.
    """
    fam = normalize_family(family)
    if not videos:
        raise ValueError("process_videos needs at least one video")
    rates = list(fps) if isinstance(fps, Sequence) else [fps] * len(videos)
    if len(rates) != len(videos):
        raise ValueError(f"got {len(rates)} fps values for {len(videos)} videos")
    clips = [load_clip(v, cfg, fam, r, limits, resize=True) for v, r in zip(videos, rates)]
    done = [process_clip(c, cfg, fam) for c in clips]
    times = tuple(time_info(c, cfg, fam) for c in clips)
    return VideoInputs(
        pixel_values_videos=torch.cat([p for p, _ in done]),
        video_grid_thw=torch.tensor([g for _, g in done], dtype=torch.long),
        second_per_grid_ts=None if fam == "qwen3_vl" else times,
        timestamps=times if fam == "qwen3_vl" else None,
    )
