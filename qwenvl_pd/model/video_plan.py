"""What a video will give the model, known before any pixel: which frames the family's sampler
takes, the size they are resized to, grid_thw and time info. Follows transformers'
Qwen2VLVideoProcessor / Qwen3VLVideoProcessor; no torch, so the proxy plans what prefill decodes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwenvl_pd.model.grid import check_aspect_ratio, smart_resize
from qwenvl_pd.model.video_io import Deadline, StreamInfo, VideoLimits, open_video, stream_info
from qwenvl_pd.model.vision_config import VisionPreprocessConfig, normalize_family


def qwen2_5_frame_indices(total: int, fps: float, cfg: VisionPreprocessConfig) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames with fps=cfg.fps: uniform, a multiple of T frames."""
    tp = cfg.temporal_patch_size
    max_frames = math.floor(min(cfg.max_frames, total) / tp) * tp
    n = min(max(total / fps * cfg.fps, cfg.min_frames), max_frames, total)
    n = math.floor(n / tp) * tp
    if n <= 0:  # shorter than one temporal patch (transformers divides by zero): keep every frame
        return list(range(total))
    step = total / n  # torch.arange(0, total, step).int(): float32 values of double steps, truncated
    return [int(np.float32(i * step)) for i in range(math.ceil(total / step))]


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


def plan_clip(container, cfg: VisionPreprocessConfig, family: str, limits: VideoLimits,
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
        return plan_clip(container, cfg, normalize_family(family), limits, Deadline(limits.timeout_s))[0]


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


def target_size(num_frames: int, height: int, width: int, cfg: VisionPreprocessConfig,
                 family: str) -> tuple[int, int]:
    if family == "qwen3_vl":
        return smart_resize_video(num_frames, height, width, cfg.temporal_patch_size, cfg.factor,
                                  cfg.video_min_pixels, cfg.video_max_pixels)
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)


def plan_size(plan: ClipPlan, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int]:
    """(h, w) the planned frames are resized to: clip_size of the clip decoding would give."""
    return target_size(len(plan.indices), plan.height, plan.width, cfg, normalize_family(family))


def plan_grid(plan: ClipPlan, cfg: VisionPreprocessConfig, family: str) -> tuple[int, int, int]:
    """grid_thw that process_videos gives the decoded clip, from the plan alone."""
    h, w = plan_size(plan, cfg, family)
    p = cfg.patch_size
    return math.ceil(len(plan.indices) / cfg.temporal_patch_size), h // p, w // p


def time_info(clip, cfg: VisionPreprocessConfig, family: str):
    """Qwen3-VL: seconds of each grid step; Qwen2.5-VL: seconds per grid step."""
    tp = cfg.temporal_patch_size
    if normalize_family(family) == "qwen3_vl":
        return grid_timestamps(clip.indices, clip.fps, tp)
    # VideoMetadata.sampled_fps: the rate of the frames kept; each grid step spans T of them
    return tp / (len(clip.indices) / clip.total_frames * clip.fps)
