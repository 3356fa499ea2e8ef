"""Image pixels for Qwen2.5-VL and Qwen3-VL (dense and MoE): decode, resize, normalise, patches +
grid_thw. Images follow transformers' PIL backend (Qwen2VLImageProcessorPil) bit for bit. The
settings live in vision_config.py, the size arithmetic in grid.py, videos in video.py."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from qwenvl_pd.model.grid import Grid, smart_resize
from qwenvl_pd.model.vision_config import VisionPreprocessConfig

ImageLike = Union[Image.Image, bytes, bytearray, memoryview, np.ndarray]


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
