"""A validated request -> what prefill gets: expanded token ids, raw media bytes, grids, hashes.

Every check that can fail does so here, before any instance is chosen, so a bad request costs
the cluster nothing. Images are never decoded: their header gives the size, and the model's own
smart-resize turns the size into the grid and the placeholder count. Nor are videos: their header
and packets give the frames prefill will sample (model/video.py probe_clip), within the limits.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from qwenvl_pd.messages import MediaItem
from qwenvl_pd.model.grid import expand_placeholders
from qwenvl_pd.model.video_io import VideoLimits
from qwenvl_pd.model.video_plan import plan_grid, probe_clip, time_info
from qwenvl_pd.model.vision_config import normalize_family
from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.prompt.media import MediaError, MediaLimits, content_hash, fetch_media, prepare_image
from qwenvl_pd.proxy.prompt.model_info import ProxyModel
from qwenvl_pd.proxy.prompt.workers import off_loop
from qwenvl_pd.proxy.protocol import ChatRequest, CompletionRequest, ImagePart, TextPart, VideoPart
from qwenvl_pd.sampling_params import SamplingParams


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: tuple[int, ...]  # placeholders expanded: what prefill computes on
    media: tuple[MediaItem, ...]  # in placeholder order
    sampling: SamplingParams  # max_tokens resolved against the context length
    cache_salt: str = ""  # prefix-cache hits only among prompts of the same salt

    @property
    def image_hashes(self) -> tuple[str, ...]:
        return tuple(m.content_hash for m in self.media)


def _media_parts(req: ChatRequest) -> list[tuple[str, ImagePart | VideoPart]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            continue
        for j, p in enumerate(m.content):
            if isinstance(p, (ImagePart, VideoPart)):
                key = "image_url" if isinstance(p, ImagePart) else "video_url"
                out.append((req.part_path.format(message=i, part=j) + f".{key}.url", p))
    return out


def _check_counts(parts: list, cfg: ProxyConfig, field: str) -> None:
    for kind, limit in ((ImagePart, cfg.max_images_per_request), (VideoPart, cfg.max_videos_per_request)):
        n = sum(isinstance(p, kind) for _, p in parts)
        if n > limit:
            what = "image" if kind is ImagePart else "video"
            raise bad_request(f"{n} {what}s in the request; at most {limit} are allowed", field)


async def _image_item(url: str, model: ProxyModel, cfg: ProxyConfig) -> MediaItem:
    img = await prepare_image(url, cfg.media_limits, model.vision)
    return MediaItem(kind="image", content_hash=img.content_hash, grid_thw=img.grid_thw, data=img.data)


def _video_grid(data: bytes, model: ProxyModel,
                limits: MediaLimits) -> tuple[tuple[int, int, int], float | None, tuple]:
    # the header and the packets give the frames prefill will sample and their size: no pixel is
    # decoded here, and prefill's decode of the same plan gives the same grid
    fam = normalize_family(model.family)
    bounds = VideoLimits(limits.max_video_frames, limits.max_image_pixels, limits.timeout_s)
    plan = probe_clip(data, model.vision, fam, bounds)
    grid, info = plan_grid(plan, model.vision, fam), time_info(plan, model.vision, fam)
    return grid, (None if fam == "qwen3_vl" else info), (info if fam == "qwen3_vl" else ())


async def _video_item(url: str, model: ProxyModel, cfg: ProxyConfig) -> MediaItem:
    data = await fetch_media(url, cfg.media_limits, "video")
    try:
        grid, per_grid_t, stamps = await asyncio.to_thread(_video_grid, data, model, cfg.media_limits)
    except ValueError as e:
        raise MediaError(str(e)) from None
    return MediaItem(kind="video", content_hash=content_hash(data), grid_thw=grid, data=data,
                     second_per_grid_t=per_grid_t, timestamps=stamps)


async def _fetch_all(parts: list, model: ProxyModel, cfg: ProxyConfig) -> list[MediaItem]:
    async def one(param: str, part) -> MediaItem:
        try:
            if isinstance(part, ImagePart):
                return await _image_item(part.url, model, cfg)
            return await _video_item(part.url, model, cfg)
        except MediaError as e:
            raise bad_request(str(e), param) from None
    tasks = [asyncio.ensure_future(one(param, part)) for param, part in parts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # the first failure answers the request: stop fetching the rest
        for t in tasks:
            t.cancel()


def _expand(ids: list[int], media: list[MediaItem], model: ProxyModel,
            field: str) -> list[int]:
    images = [m.grid_thw for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    try:
        return expand_placeholders(ids, images, [v.grid_thw for v in videos], model.vision.merge_size,
                                   family=model.family, video_timestamps=[v.timestamps for v in videos],
                                   encode=model.encode, ids=model.ids)
    except ValueError as e:  # e.g. the text itself carries placeholder tokens
        raise bad_request(str(e), field) from None


def _check_logit_bias(sampling: SamplingParams, model: ProxyModel) -> None:
    vocab = len(model.tokenizer)
    bad = sorted(t for t in sampling.logit_bias or () if t >= vocab)
    if bad:
        raise bad_request(f"'logit_bias' names token id {bad[0]}, outside the vocabulary (size {vocab})",
                          "logit_bias")


def _resolve(token_ids: list[int], sampling: SamplingParams, model: ProxyModel,
             prompt_param: str) -> SamplingParams:
    _check_logit_bias(sampling, model)
    n, limit = len(token_ids), model.max_model_len
    if n >= limit:
        raise bad_request(f"the prompt is {n} tokens (images and videos expanded); this model's "
                          f"maximum context length is {limit} tokens", prompt_param)
    room = limit - n
    if sampling.max_tokens is None:
        return dataclasses.replace(sampling, max_tokens=room, max_completion_tokens=None)
    if sampling.max_tokens > room:
        raise bad_request(f"max_tokens ({sampling.max_tokens}) + the prompt ({n} tokens) exceeds this "
                          f"model's maximum context length of {limit} tokens", "max_tokens")
    return sampling


def _check_media_times_n(media: list[MediaItem], n: int, bound: int) -> None:
    total = sum(len(m.data) + sum(map(len, m.frames)) for m in media)
    if total * n > bound:
        raise bad_request(f"the request's media ({total} bytes) times n ({n}) is more than "
                          f"{bound} bytes (--max-request-media-bytes)", "n")


def _check_size(chars: int, model: ProxyModel, field: str) -> None:
    """Refuse text that cannot fit before paying for rendering or tokenising it."""
    fewest, limit = model.fewest_tokens(chars), model.max_model_len
    if fewest >= limit:
        raise bad_request(f"the prompt is {chars} characters, at least {fewest} tokens; this model's "
                          f"maximum context length is {limit} tokens", field)


def _text_chars(req: ChatRequest) -> int:
    return sum(len(p.text) for m in req.messages for p in m.parts if isinstance(p, TextPart))


async def prepare_chat(req: ChatRequest, model: ProxyModel, cfg: ProxyConfig) -> PreparedPrompt:
    parts = _media_parts(req)
    _check_counts(parts, cfg, req.prompt_field)
    _check_size(_text_chars(req), model, req.prompt_field)
    text = await off_loop(model.template.render, req.messages, req.add_generation_prompt,
                          req.chat_template_kwargs, req.tools)
    ids = await off_loop(model.encode, text)  # as the offline LLM encodes a prompt string
    media = await _fetch_all(parts, model, cfg)
    _check_media_times_n(media, req.sampling.n, cfg.max_request_media_bytes)
    expanded = _expand(ids, media, model, req.prompt_field)
    sampling = _resolve(expanded, req.sampling, model, req.prompt_field)
    return PreparedPrompt(tuple(expanded), tuple(media), sampling, req.cache_salt)


async def prepare_completion(req: CompletionRequest, model: ProxyModel) -> PreparedPrompt:
    if isinstance(req.prompt, str):
        _check_size(len(req.prompt), model, "prompt")
        ids = await off_loop(model.encode, req.prompt)
    else:
        ids, vocab = list(req.prompt), len(model.tokenizer)
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt")
    if model.ids.image_pad in ids or model.ids.video_pad in ids:
        raise bad_request("completion prompts cannot carry image or video placeholders; use "
                          "/v1/chat/completions with image_url parts", "prompt")
    if not ids:
        raise bad_request("the prompt encodes to no tokens", "prompt")
    return PreparedPrompt(tuple(ids), (), _resolve(ids, req.sampling, model, "prompt"), req.cache_salt)

