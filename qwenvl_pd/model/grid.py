"""Grid and placeholder arithmetic of Qwen-VL vision inputs: smart-resize, grid_thw and vision
token counts from sizes alone, placeholder expansion on token ids. Pure Python (no torch, no
pixels), so the proxy computes what prefill will compute without loading the model's stack."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qwenvl_pd.model.vision_config import VisionPreprocessConfig, normalize_family

MAX_ASPECT_RATIO = 200
Grid = tuple[int, int, int]


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


def expand_placeholders(token_ids: Sequence[int], image_grid_thw: Sequence[Sequence[int]] = (),
                        video_grid_thw: Sequence[Sequence[int]] = (), merge_size: int = 2, *,
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
