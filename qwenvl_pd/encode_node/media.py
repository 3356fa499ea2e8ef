"""One MediaItem's bytes -> the pixels the tower takes, checked against what the proxy said."""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from qwenvl_pd.kv_transfer.embedding_key import bytes_hash
from qwenvl_pd.messages import MediaItem
from qwenvl_pd.model.processor import process_images
from qwenvl_pd.model.video import process_videos
from qwenvl_pd.model.vision_config import VisionPreprocessConfig


class MediaError(ValueError):
    """Media the encoder cannot encode as sent; the message says which item and why."""


@dataclass(frozen=True, eq=False)
class Pixels:
    values: torch.Tensor            # [t*h*w, C*T*P*P] float32
    grid_thw: tuple[int, int, int]


def num_tokens(item: MediaItem, merge: int) -> int:
    t, h, w = item.grid_thw
    return t * h * w // merge ** 2


def check_request(media: tuple[MediaItem, ...], limits: dict[str, int], max_tokens: int, merge: int) -> None:
    """Raises MediaError for too many items of a kind or an item over the batch budget."""
    for kind, limit in limits.items():
        count = sum(1 for m in media if m.kind == kind)
        if count > limit:
            raise MediaError(f"{count} {kind}s in one Encode request; this encoder takes at most {limit}")
    for i, item in enumerate(media):
        tokens = num_tokens(item, merge)
        if tokens <= 0 or tokens > max_tokens:
            raise MediaError(f"media {i}: grid {tuple(item.grid_thw)} gives {tokens} vision tokens; "
                             f"one item may have 1 to {max_tokens} (--max-encode-batch-tokens)")
        if not (item.data or item.frames):
            raise MediaError(f"media {i}: no bytes to encode (an embedding handle is for prefill)")


def to_pixels(item: MediaItem, cfg: VisionPreprocessConfig, family: str) -> Pixels:
    """Decode and preprocess exactly as prefill would; MediaError when the bytes do not match
    their content hash, cannot be decoded, or give another grid than the proxy computed."""
    if item.data and bytes_hash(item.data) != item.content_hash:
        raise MediaError(f"{item.kind}: content_hash {item.content_hash[:16]}... is not the sha256 of its bytes")
    try:
        if item.kind == "image":
            out = process_images([item.data], cfg)
            values, grid = out.pixel_values, out.image_grid_thw
        else:
            video = [Image.open(io.BytesIO(f)) for f in item.frames] if item.frames else item.data
            out = process_videos([video], cfg, family, [item.fps])
            values, grid = out.pixel_values_videos, out.video_grid_thw
    except (ValueError, OSError) as e:
        raise MediaError(f"{item.kind}: {e}") from None
    got = tuple(grid[0].tolist())
    if got != tuple(item.grid_thw):
        raise MediaError(f"{item.kind}: the request says grid {tuple(item.grid_thw)}, the bytes give "
                         f"{got} with this model's processor")
    return Pixels(values, got)
