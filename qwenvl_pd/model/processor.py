"""Vision preprocessing for Qwen2.5-VL and Qwen3-VL (dense and MoE): checkpoint config,
smart-resize, pixel patches + grid_thw, placeholder expansion on token ids. Images follow
transformers' PIL backend (Qwen2VLImageProcessorPil) bit for bit. Videos live in video.py."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

ImageLike = Union[Image.Image, bytes, bytearray, memoryview, np.ndarray]
Grid = tuple[int, int, int]


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
        return _config_from_dicts(image, str(image_file), video, str(video_file))


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


def _config_from_dicts(image: dict, image_file: str, video: dict | None, video_file: str):
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


def check_aspect_ratio(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image is empty: {width}x{height} pixels (width x height)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)} ({width}x{height})")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) -> sides divisible by factor, area in [min_pixels, max_pixels], aspect ~kept.

    Same arithmetic as transformers' qwen2_vl smart_resize (tiny images are scaled up, not refused).
    """
    check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(height: int, width: int, cfg: VisionPreprocessConfig) -> Grid:
    """grid_thw of an image from its size alone (the proxy never builds pixel tensors)."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def num_vision_tokens(grid: Sequence[int], merge_size: int) -> int:
    t, h, w = (int(x) for x in grid)
    return t * h * w // merge_size**2


def to_rgb(img: Image.Image) -> Image.Image:
    # transparency is composited onto white, as transformers' convert_to_rgb does
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_image_bytes(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file must fail here, not inside the encoder
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"bytes are not a decodable image ({len(data)} bytes): {e}") from None
    # cameras store the rotation in EXIF; transformers' load_image applies it too
    return ImageOps.exif_transpose(img)


def load_image(src: ImageLike) -> Image.Image:
    """PIL image, encoded bytes or an HWC/HW uint8 array -> RGB PIL image."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = _decode_image_bytes(bytes(src))
    elif isinstance(src, np.ndarray):
        src = src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (3, 4)):
            raise ValueError(f"image arrays must be uint8 HxW or HxWxC (C in 1,3,4), "
                             f"got {src.dtype} {src.shape}")
        src = Image.fromarray(src)
    elif not isinstance(src, Image.Image):
        raise ValueError(f"unsupported image input {type(src).__name__}: want PIL.Image, bytes or ndarray")
    return to_rgb(src)


def resize_normalize(img: Image.Image, height: int, width: int, cfg: VisionPreprocessConfig) -> np.ndarray:
    """RGB image -> [3, height, width] float32: PIL bicubic, /255 in float64, then (x - mean) / std."""
    x = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)
    # the float64 rescale then float32 normalize order is transformers' and keeps the bits equal
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x.transpose(2, 0, 1)


def patchify(frames: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, Grid]:
    """frames [N, C, H, W] float32 -> (patches [gt*gh*gw, C*T*P*P], (gt, gh, gw)).

    N is padded to a multiple of T by repeating the last frame, so an image is one frame seen T
    times. Patches are ordered merge window by merge window, the order the vision merger expects.
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    n, c, h, w = frames.shape
    gt, gh, gw = n // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, T, P, P)
    x = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)
    return torch.from_numpy(x), (gt, gh, gw)


@dataclass(frozen=True, eq=False)
class ImageInputs:
    pixel_values: torch.Tensor  # [sum(t*h*w), C*T*P*P] float32
    image_grid_thw: torch.Tensor  # [num_images, 3] long


def process_image(src: ImageLike, cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, Grid]:
    img = load_image(src)
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return patchify(resize_normalize(img, h, w, cfg)[None], cfg)


def process_images(images: Sequence[ImageLike], cfg: VisionPreprocessConfig) -> ImageInputs:
    if not images:
        raise ValueError("process_images needs at least one image")
    done = [process_image(src, cfg) for src in images]
    return ImageInputs(torch.cat([p for p, _ in done]), torch.tensor([g for _, g in done], dtype=torch.long))


@dataclass(frozen=True)
class VisionTokenIds:
    # the Qwen2 vocabulary shared by Qwen2.5-VL and Qwen3-VL
    vision_start: int = 151652
    vision_end: int = 151653
    image_pad: int = 151655
    video_pad: int = 151656


def _check_count(token_ids: Sequence[int], pad: int, n_items: int, what: str) -> None:
    n_pads = sum(1 for t in token_ids if t == pad)
    if n_pads != n_items:
        raise ValueError(f"prompt has {n_pads} {what} placeholder token(s) (id {pad}) "
                         f"but {n_items} {what}(s) were given")


def _qwen3_video_tokens(grid: Sequence[int], stamps: Sequence[float], merge_size: int,
                        encode: Callable[[str], list[int]], ids: VisionTokenIds) -> list[int]:
    # Qwen3VLProcessor replaces the video pad with, per temporal step, "<t seconds>" + a framed frame
    t, h, w = (int(x) for x in grid)
    if len(stamps) != t:
        raise ValueError(f"video has {t} temporal grid steps but {len(stamps)} timestamps")
    frame = [ids.vision_start] + [ids.video_pad] * (h * w // merge_size**2) + [ids.vision_end]
    out: list[int] = []
    for s in stamps:
        out += list(encode(f"<{s:.1f} seconds>")) + frame
    return out


def expand_placeholders(token_ids: Sequence[int], image_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (),
                        video_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (), merge_size: int = 2, *,
                        family: str, video_timestamps: Sequence[Sequence[float]] | None = None,
                        encode: Callable[[str], list[int]] | None = None,
                        ids: VisionTokenIds = VisionTokenIds()) -> list[int]:
    """Expand each image/video pad token to its vision token count (Qwen3-VL: timestamped frames)."""
    fam = normalize_family(family)
    images, videos = [tuple(g) for g in image_grid_thw], [tuple(g) for g in video_grid_thw]
    _check_count(token_ids, ids.image_pad, len(images), "image")
    _check_count(token_ids, ids.video_pad, len(videos), "video")
    if fam == "qwen3_vl" and videos and (encode is None or video_timestamps is None):
        raise ValueError("Qwen3-VL videos need video_timestamps and an encode(text) -> ids callable")
    out: list[int] = []
    img_it, vid_it = iter(images), iter(enumerate(videos))
    for tok in token_ids:
        if tok == ids.image_pad:
            out += [ids.image_pad] * num_vision_tokens(next(img_it), merge_size)
        elif tok == ids.video_pad and fam == "qwen3_vl":
            i, grid = next(vid_it)
            out += _qwen3_video_tokens(grid, video_timestamps[i], merge_size, encode, ids)
        elif tok == ids.video_pad:
            out += [ids.video_pad] * num_vision_tokens(next(vid_it)[1], merge_size)
        else:
            out.append(tok)
    return out
