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
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.model.video import VideoInputs, process_videos

DEFAULT_LIMIT = 999


class InputError(ValueError):
    """A prompt that cannot be served; the message says why."""


@dataclass(frozen=True, eq=False)
class MMItem:
    """One image or video of a prompt, in the order its placeholders appear."""
    kind: str                    # "image" | "video"
    content_hash: str            # sha256 over grid and patches: equal pixels, equal hash
    pixel_values: torch.Tensor   # [t*h*w, C*T*P*P]
    grid_thw: tuple[int, int, int]
    num_tokens: int              # placeholder tokens it fills
    span: tuple[int, int]        # [first placeholder, last placeholder + 1) in the prompt


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


def _items(token_ids: list[int], images: ImageInputs | None, videos: VideoInputs | None,
           ids: VisionTokenIds, merge: int) -> list[MMItem]:
    pending = {ids.image_pad: _split("image", images and images.pixel_values,
                                     images and images.image_grid_thw, merge),
               ids.video_pad: _split("video", videos and videos.pixel_values_videos,
                                     videos and videos.video_grid_thw, merge)}
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
        """A prompt whose placeholders a proxy already expanded; media as raw bytes or frames.
        The runs of placeholders must match the grids the media give here."""
        mm = {"image": images or None, "video": videos or None}
        images_in, videos_in = self._media({k: v for k, v in mm.items() if v}, video_fps)
        try:
            return self._finish(list(token_ids), images_in, videos_in)
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

    def _finish(self, expanded: list[int], images: ImageInputs | None,
                videos: VideoInputs | None) -> ProcessedPrompt:
        merge = self.config.vision.spatial_merge_size
        if len(expanded) >= self.max_model_len:
            raise InputError(f"prompt is {len(expanded)} tokens (images and videos expanded); "
                             f"max_model_len is {self.max_model_len}")
        positions, delta = mrope_positions(
            expanded, _grid(images and images.image_grid_thw), _grid(videos and videos.video_grid_thw),
            merge, family=self.family, image_token_id=self.ids.image_pad,
            video_token_id=self.ids.video_pad,
            second_per_grid_ts=videos.second_per_grid_ts if videos else None,
            tokens_per_second=self.config.vision.tokens_per_second)
        items = _items(expanded, images, videos, self.ids, merge)
        return ProcessedPrompt(expanded, positions, delta, items, images, videos)


def _grid(grid: torch.Tensor | None) -> torch.Tensor:
    return grid if grid is not None else torch.zeros(0, 3, dtype=torch.long)
