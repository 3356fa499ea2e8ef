"""Video preprocessing for Qwen2.5-VL and Qwen3-VL: decode the planned frames, resize, patches.

Sampling, sizes and time info (video_plan.py) follow transformers' Qwen2VLVideoProcessor /
Qwen3VLVideoProcessor; frames are resized with PIL bicubic like images (transformers resizes videos
with torchvision, which we do not depend on). Decoding uses PyAV, as transformers' "pyav" backend does, within VideoLimits
(video_io.py); process_videos resizes each frame as it is decoded, so only model-size frames
are ever held.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image

from qwenvl_pd.model.processor import load_image, patchify, resize_normalize
from qwenvl_pd.model.video_io import Deadline, StreamInfo, VideoLimits, decode_frames, open_video
from qwenvl_pd.model.video_plan import (ClipPlan, plan_clip, plan_size, qwen3_frame_indices, target_size,
                                        time_info)
from qwenvl_pd.model.vision_config import VisionPreprocessConfig, normalize_family

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
    new = size and target_size(len(indices), plan.height, plan.width, cfg, family)
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
        plan, info = plan_clip(container, cfg, family, limits, deadline)
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


def clip_size(clip: Clip, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int]:
    if clip.size is not None:
        return clip.size
    sizes = {f.size for f in clip.frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
    (width, height), = sizes
    return target_size(len(clip.frames), height, width, cfg, family)


def process_clip(clip: Clip, cfg: VisionPreprocessConfig, family: str):
    """Clip -> (patches [gt*gh*gw, C*T*P*P], grid (gt, gh, gw))."""
    h, w = clip_size(clip, cfg, family)
    # frames resized while decoding are already (h, w): PIL's resize to the same size is a copy
    return patchify(np.stack([resize_normalize(f, h, w, cfg) for f in clip.frames]), cfg)


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
