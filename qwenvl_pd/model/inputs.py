"""Prompt + multimodal data -> expanded token ids, pixel patches and M-RoPE positions."""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.mrope import mrope_positions
from qwenvl_pd.model.grid import VisionTokenIds, expand_placeholders
from qwenvl_pd.model.processor import ImageInputs, process_images
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.model.vision_config import VisionPreprocessConfig, normalize_family
from qwenvl_pd.model.video import VideoInputs, process_videos

DEFAULT_LIMIT = 999


class InputError(ValueError):
    """A prompt that cannot be served; the message says why."""


@dataclass(frozen=True, eq=False)
class MMItem:
    """One image or video of a prompt, in the order its placeholders appear: its pixels, or the
    embeddings an encoder already made of them."""
    kind: str                    # "image" | "video"
    # sha256 over grid and patches (equal pixels, equal hash), or an embedded item's key
    content_hash: str
    pixel_values: torch.Tensor | None  # [t*h*w, C*T*P*P]; None when embeds are carried
    grid_thw: tuple[int, int, int]
    num_tokens: int              # placeholder tokens it fills
    span: tuple[int, int]        # [first placeholder, last placeholder + 1) in the prompt
    embeds: VisionEmbeds | None = None  # made elsewhere: the tower is not run for this item


@dataclass(frozen=True, eq=False)
class Embedded:
    """A media item given as embeddings (read from an encoder) instead of bytes: its grid and
    time info place it, no pixel is processed."""
    grid_thw: tuple[int, int, int]
    key: str                     # the embedding key: the item's prefix-cache hash
    embeds: VisionEmbeds         # embeds [num_tokens, hidden], deepstack [k, num_tokens, hidden]
    second_per_grid_t: float | None = None  # Qwen2.5-VL video


@dataclass
class ProcessedPrompt:
    token_ids: list[int]      # placeholders expanded
    positions: torch.Tensor   # [3, len(token_ids)]
    mrope_delta: int
    items: list[MMItem]
    images: ImageInputs | None = None
    videos: VideoInputs | None = None

    @property
    def mm_spans(self) -> list[tuple[int, int, str]]:
        return [(*it.span, it.content_hash) for it in self.items]


def _items(token_ids: list[int], parts: dict[str, list[dict]], ids: VisionTokenIds) -> list[MMItem]:
    pending = {ids.image_pad: list(parts["image"]), ids.video_pad: list(parts["video"])}
    items, current, left = [], None, 0
    for i, tok in enumerate(token_ids):
        if tok not in pending:
            continue
        if left == 0:  # a new item starts; Qwen3-VL video frames continue the same item
            current = pending[tok].pop(0)
            left, current["span"] = current["num_tokens"], [i, i]
        left -= 1
        current["span"][1] = i + 1
        if left == 0:
            items.append(MMItem(**{**current, "span": tuple(current["span"])}))
    return items


def _split(kind: str, pixels, grids, merge: int) -> list[dict]:
    if pixels is None:
        return []
    out, offset = [], 0
    for t, h, w in grids.tolist():
        patches = pixels[offset:offset + t * h * w]
        offset += t * h * w
        digest = hashlib.sha256(f"{kind}:{t},{h},{w}".encode())
        digest.update(patches.numpy().tobytes())
        out.append(dict(kind=kind, content_hash=digest.hexdigest(), pixel_values=patches,
                        grid_thw=(t, h, w), num_tokens=t * h * w // merge ** 2))
    return out


def _merged(kind: str, given: list | None, pixels, grids, merge: int) -> list[dict]:
    """Each item of `given` in order: a processed one's patches or an Embedded's embeddings
    (given None: every item was processed)."""
    processed = _split(kind, pixels, grids, merge)
    if given is None:
        return processed
    rest = iter(processed)
    return [_embedded(kind, g, merge) if isinstance(g, Embedded) else next(rest) for g in given]


def _embedded(kind: str, item: Embedded, merge: int) -> dict:
    t, h, w = item.grid_thw
    n = t * h * w // merge ** 2
    rows = item.embeds.embeds.shape[0]
    if rows != n or (item.embeds.deepstack is not None and item.embeds.deepstack.shape[1] != n):
        raise ValueError(f"{kind} embeddings have {rows} rows; grid {tuple(item.grid_thw)} needs {n}")
    return dict(kind=kind, content_hash=item.key, pixel_values=None, grid_thw=tuple(item.grid_thw),
                num_tokens=n, embeds=item.embeds)


def _seconds(given: list | None, videos: VideoInputs | None, qwen3: bool) -> list | None:
    """Qwen2.5-VL: seconds per temporal grid step of each video, processed or embedded."""
    own = list(videos.second_per_grid_ts or ()) if videos else []
    if given is None or qwen3:
        return own or None
    rest = iter(own)
    secs = [g.second_per_grid_t if isinstance(g, Embedded) else next(rest) for g in given]
    if any(s is None for s in secs):
        raise ValueError("an embedded Qwen2.5-VL video needs second_per_grid_t")
    return secs or None


def _as_list(kind: str, value) -> list:
    if not isinstance(value, list):
        return [value]
    # a video may itself be a list of frames (PIL images or [H, W, C] arrays)
    if kind == "video" and value and (isinstance(value[0], Image.Image) or
                                      getattr(value[0], "ndim", 0) == 3):
        return [value]
    return value


class InputProcessor:
    def __init__(self, model_dir: Path, config: ModelConfig, encode: Callable[[str], list[int]],
                 max_model_len: int, limit_mm_per_prompt: dict[str, int]):
        self.config = config
        self.family = config.family
        self.encode = encode
        self.max_model_len = max_model_len
        self.limits = {"image": DEFAULT_LIMIT, "video": DEFAULT_LIMIT, **limit_mm_per_prompt}
        self.vision_cfg = VisionPreprocessConfig.from_dir(model_dir)
        self.ids = VisionTokenIds(config.vision_start_token_id, config.vision_end_token_id,
                                  config.image_token_id, config.video_token_id)

    def process(self, prompt) -> ProcessedPrompt:
        prompt = {"prompt": prompt} if isinstance(prompt, str) else prompt
        if not isinstance(prompt, dict) or not ("prompt" in prompt or "prompt_token_ids" in prompt):
            raise InputError("each prompt must be a str or a dict with 'prompt' or 'prompt_token_ids'")
        ids = prompt.get("prompt_token_ids") or self.encode(prompt["prompt"])
        images, videos = self._media(prompt.get("multi_modal_data") or {})
        try:
            return self._expand(list(ids), images, videos)
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None

    def _media(self, mm: dict, video_fps: list | None = None):
        unknown = set(mm) - {"image", "video"}
        if unknown:
            raise InputError(f"unsupported multi_modal_data keys {sorted(unknown)}; use 'image', 'video'")
        items = {k: _as_list(k, v) for k, v in mm.items() if v is not None}
        for kind, values in items.items():
            if len(values) > self.limits[kind]:
                raise InputError(f"{len(values)} {kind}s given; limit_mm_per_prompt allows "
                                 f"{self.limits[kind]} per prompt")
        images = items.get("image") or []
        videos = items.get("video") or []
        try:
            return (process_images(images, self.vision_cfg) if images else None,
                    process_videos(videos, self.vision_cfg, self.family, video_fps) if videos else None)
        except ValueError as e:
            raise InputError(str(e)) from None

    def process_expanded(self, token_ids: list[int], images: list, videos: list,
                         video_fps: list | None = None) -> ProcessedPrompt:
        """A prompt whose placeholders a proxy already expanded; media as raw bytes or frames, or
        as Embedded (grid and embeddings only: no pixel is made for those). The runs of
        placeholders must match the grids the media give here."""
        fps = video_fps or [None] * len(videos)
        raw_images = [x for x in images if not isinstance(x, Embedded)]
        raw = [(v, f) for v, f in zip(videos, fps) if not isinstance(v, Embedded)]
        mm = {"image": raw_images or None, "video": [v for v, _ in raw] or None}
        images_in, videos_in = self._media({k: v for k, v in mm.items() if v},
                                           [f for _, f in raw] if video_fps else None)
        try:
            return self._finish(list(token_ids), images_in, videos_in, list(images), list(videos))
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None

    def _expand(self, ids: list[int], images: ImageInputs | None,
                videos: VideoInputs | None) -> ProcessedPrompt:
        merge = self.config.vision.spatial_merge_size
        expanded = expand_placeholders(
            ids, _grid(images and images.image_grid_thw), _grid(videos and videos.video_grid_thw),
            merge, family=self.family, video_timestamps=videos.timestamps if videos else None,
            encode=self.encode, ids=self.ids)
        return self._finish(expanded, images, videos)

    def _finish(self, expanded: list[int], images: ImageInputs | None, videos: VideoInputs | None,
                given_images: list | None = None, given_videos: list | None = None) -> ProcessedPrompt:
        merge = self.config.vision.spatial_merge_size
        if len(expanded) >= self.max_model_len:
            raise InputError(f"prompt is {len(expanded)} tokens (images and videos expanded); "
                             f"max_model_len is {self.max_model_len}")
        parts = {"image": _merged("image", given_images, images and images.pixel_values,
                                  images and images.image_grid_thw, merge),
                 "video": _merged("video", given_videos, videos and videos.pixel_values_videos,
                                  videos and videos.video_grid_thw, merge)}
        # M-RoPE needs only the grids (and Qwen2.5-VL's seconds per step): embedded items too
        positions, delta = mrope_positions(
            expanded, _grids(parts["image"]), _grids(parts["video"]), merge, family=self.family,
            image_token_id=self.ids.image_pad, video_token_id=self.ids.video_pad,
            second_per_grid_ts=_seconds(given_videos, videos, normalize_family(self.family) == "qwen3_vl"),
            tokens_per_second=self.config.vision.tokens_per_second)
        items = _items(expanded, parts, self.ids)
        return ProcessedPrompt(expanded, positions, delta, items, images, videos)


def _grids(parts: list[dict]) -> torch.Tensor:
    return torch.tensor([p["grid_thw"] for p in parts], dtype=torch.long).view(-1, 3)


def _grid(grid: torch.Tensor | None) -> torch.Tensor:
    return grid if grid is not None else torch.zeros(0, 3, dtype=torch.long)
