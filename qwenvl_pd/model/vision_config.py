"""The checkpoint's vision preprocessing settings (preprocessor_config.json and
video_preprocessor_config.json), parsed and checked once; no pixels, no torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_family(family: str) -> str:
    # the MoE variant preprocesses (and positions) exactly like the dense one
    fam = "qwen3_vl" if family == "qwen3_vl_moe" else family
    if fam not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES + ('qwen3_vl_moe',)}")
    return fam


@dataclass(frozen=True)
class VisionPreprocessConfig:
    # defaults are transformers' Qwen2VLImageProcessor / video processor class defaults
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    fps: float = 2.0  # target sampling rate of decoded videos
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        # resized sides must hold whole merge windows of patches
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str | Path) -> VisionPreprocessConfig:
        root = Path(path)
        image_file = root / "preprocessor_config.json"
        video_file = root / "video_preprocessor_config.json"
        image = _load_json(image_file)
        video = _load_json(video_file) if video_file.exists() else None
        return config_from_dicts(image, str(image_file), video, str(video_file))


def _load_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"{file}: file not found (the checkpoint needs it for vision preprocessing)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _lookup(d: dict, keys: Sequence[str], default: Any, file: str) -> tuple[str, Any]:
    # first present key wins; "size.x" reads the nested size dict (Qwen3-VL style)
    size = d.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"{file}: key 'size' must be an object, got {size!r}")
    for key in keys:
        holder, name = (size, key[5:]) if key.startswith("size.") else (d, key)
        if name in holder:
            return key, holder[name]
    return keys[0], default


def _int(d: dict, keys: Sequence[str], default: int, file: str, minimum: int = 1) -> int:
    key, v = _lookup(d, keys, default, file)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{file}: key {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _floats(d: dict, key: str, default: tuple[float, ...], file: str, positive: bool) -> tuple[float, ...]:
    v = d.get(key, default)
    ok = isinstance(v, (list, tuple)) and len(v) == 3
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if not ok or (positive and min(v) <= 0):
        want = "3 positive numbers" if positive else "3 numbers"
        raise ValueError(f"{file}: key {key!r} must be a list of {want}, got {v!r}")
    return tuple(float(x) for x in v)


def _budget(d: dict, file: str, lo_default: int, hi_default: int) -> tuple[int, int]:
    # explicit min/max_pixels override size, as Qwen2VLImageProcessor.__init__ does
    lo = _int(d, ("min_pixels", "size.shortest_edge", "size.min_pixels"), lo_default, file)
    hi = _int(d, ("max_pixels", "size.longest_edge", "size.max_pixels"), hi_default, file)
    if hi < lo:
        raise ValueError(f"{file}: max pixels ({hi}) is below min pixels ({lo})")
    return lo, hi


def _same_as_image(src: dict, src_file: str, image_file: str, fields: dict) -> None:
    # one config serves images and videos: the video processor must agree on patches and stats
    for key, want in fields.items():
        got = (_floats(src, key, want, src_file, key == "image_std") if isinstance(want, tuple)
               else _int(src, (key,), want, src_file))
        if got != want:
            raise ValueError(f"{src_file}: key {key!r} differs from {image_file} ({want}); unsupported")


def _frame_fields(d: dict, file: str) -> tuple[float, int, int]:
    fps = d.get("fps")
    fps = 2.0 if fps is None else fps  # saved configs write null when no rate was set
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"{file}: key 'fps' must be a positive number, got {fps!r}")
    lo, hi = _int(d, ("min_frames",), 4, file), _int(d, ("max_frames",), 768, file)
    if hi < lo:
        raise ValueError(f"{file}: key 'max_frames' ({hi}) is below 'min_frames' ({lo})")
    return float(fps), lo, hi


def config_from_dicts(image: dict, image_file: str, video: dict | None, video_file: str):
    patch, merge = _int(image, ("patch_size",), 14, image_file), _int(image, ("merge_size",), 2, image_file)
    temporal = _int(image, ("temporal_patch_size",), 2, image_file)
    lo, hi = _budget(image, image_file, 56 * 56, 28 * 28 * 1280)
    mean = _floats(image, "image_mean", CLIP_MEAN, image_file, positive=False)
    std = _floats(image, "image_std", CLIP_STD, image_file, positive=True)
    # without a video file transformers builds the video processor from preprocessor_config.json
    src, src_file = (video, video_file) if video is not None else (image, image_file)
    _same_as_image(src, src_file, image_file, {"patch_size": patch, "merge_size": merge,
                                               "temporal_patch_size": temporal, "image_mean": mean,
                                               "image_std": std})
    f2 = (patch * merge) ** 2
    vlo, vhi = (lo, hi) if video is None else _budget(video, video_file, 128 * f2, 768 * f2)
    fps, min_frames, max_frames = _frame_fields(src, src_file)
    return VisionPreprocessConfig(patch, merge, temporal, lo, hi, mean, std, vlo, vhi, fps, min_frames,
                                  max_frames)

