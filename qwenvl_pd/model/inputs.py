"""Prompt + multimodal data -> expanded token ids, pixel patches and M-RoPE positions."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.model.mrope import mrope_positions
from qwenvl_pd.model.processor import (ImageInputs, VisionPreprocessConfig, VisionTokenIds,
                                       expand_placeholders, process_images)
from qwenvl_pd.model.video import VideoInputs, process_videos
from qwenvl_pd.model.vision import VisionEmbeds

DEFAULT_LIMIT = 999


class InputError(ValueError):
    """A prompt that cannot be served; the message says why."""


@dataclass
class ProcessedPrompt:
    token_ids: list[int]      # placeholders expanded
    positions: torch.Tensor   # [3, len(token_ids)]
    mrope_delta: int
    images: ImageInputs | None
    videos: VideoInputs | None
    image_token_id: int
    video_token_id: int

    def encode_vision(self, model) -> VisionEmbeds | None:
        """Run the vision tower; rows ordered as the placeholders appear in the prompt."""
        if self.images is None and self.videos is None:
            return None
        ids = torch.tensor(self.token_ids)
        kinds = ids[(ids == self.image_token_id) | (ids == self.video_token_id)]
        parts = []
        if self.images is not None:
            parts.append((kinds == self.image_token_id, model.encode_vision(
                self.images.pixel_values, self.images.image_grid_thw)))
        if self.videos is not None:
            parts.append((kinds == self.video_token_id, model.encode_vision(
                self.videos.pixel_values_videos, self.videos.video_grid_thw)))
        return _scatter(parts, len(kinds))


def _scatter(parts, total: int) -> VisionEmbeds:
    first = parts[0][1]
    embeds = first.embeds.new_empty(total, first.embeds.shape[-1])
    deep = None if first.deepstack is None else first.deepstack.new_empty(
        first.deepstack.shape[0], total, first.deepstack.shape[-1])
    for mask, enc in parts:
        embeds[mask] = enc.embeds
        if deep is not None:
            deep[:, mask] = enc.deepstack
    return VisionEmbeds(embeds, deep)


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

    def _media(self, mm: dict):
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
                    process_videos(videos, self.vision_cfg, self.family) if videos else None)
        except ValueError as e:
            raise InputError(str(e)) from None

    def _expand(self, ids: list[int], images: ImageInputs | None,
                videos: VideoInputs | None) -> ProcessedPrompt:
        merge = self.config.vision.spatial_merge_size
        image_grid = images.image_grid_thw if images else torch.zeros(0, 3, dtype=torch.long)
        video_grid = videos.video_grid_thw if videos else torch.zeros(0, 3, dtype=torch.long)
        expanded = expand_placeholders(
            ids, image_grid, video_grid, merge, family=self.family,
            video_timestamps=videos.timestamps if videos else None, encode=self.encode, ids=self.ids)
        if len(expanded) >= self.max_model_len:
            raise InputError(f"prompt is {len(expanded)} tokens (images and videos expanded); "
                             f"max_model_len is {self.max_model_len}")
        positions, delta = mrope_positions(
            expanded, image_grid, video_grid, merge, family=self.family,
            image_token_id=self.ids.image_pad, video_token_id=self.ids.video_pad,
            second_per_grid_ts=videos.second_per_grid_ts if videos else None,
            tokens_per_second=self.config.vision.tokens_per_second)
        return ProcessedPrompt(expanded, positions, delta, images, videos,
                               self.ids.image_pad, self.ids.video_pad)
