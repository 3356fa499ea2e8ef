"""The two workloads of benchmarks/epd.py, as loadgen BenchRequests (seeded: every mode gets the
same requests, byte for byte).

image-heavy: 2-4 images of 448-896 px (each side a multiple of 28) per request; half the image
slots reuse a small shared set (each of its images recurs in about three requests), the other
half are new. A distinct text lead goes *before* the images, so a repeat is an embedding-cache
hit, not a prefix-cache hit that would skip the vision tower in every mode alike.
image-light: one request in ten carries one image, the rest are text only.
"""
from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from qwenvl_pd.loadgen.datasets import WORDS, BenchRequest

WORKLOADS = ("image-heavy", "image-light")
SIDES = tuple(range(448, 897, 28))  # 448..896 px


@dataclass(frozen=True)
class WorkloadConfig:
    requests: int = 48
    input_len: int = 64  # text words per request
    output_len: int = 64
    images_per_request: tuple[int, int] = (2, 4)
    repeated_fraction: float = 0.5  # image-heavy: image slots taken from the shared set
    light_image_fraction: float = 0.1  # image-light: requests with one image
    seed: int = 0


def image(seed: int, width: int, height: int) -> str:
    """A data URL: smooth colour noise (photo-like JPEG sizes, not worst-case random bytes)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(model: str, text: str, images: list[str], cfg: WorkloadConfig) -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": cfg.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def _text(rng: random.Random, i: int, n: int) -> str:
    return f"{i}:" + "".join(" " + rng.choice(WORDS) for _ in range(n - 1))


def image_slots(name: str, cfg: WorkloadConfig) -> list[list[tuple[int, int, int]]]:
    """Per request, its images as (seed, width, height); equal seeds are the same image."""
    rng = random.Random(cfg.seed)
    if name == "image-light":
        chosen = set(rng.sample(range(cfg.requests), round(cfg.requests * cfg.light_image_fraction)))
        return [[(10_000 + i, rng.choice(SIDES), rng.choice(SIDES))] if i in chosen else []
                for i in range(cfg.requests)]
    if name != "image-heavy":
        raise ValueError(f"unknown workload {name!r}: {' | '.join(WORKLOADS)}")
    # at least 4: a request (<= 4 images) always finds a shared image it does not hold yet
    shared = [(s, rng.choice(SIDES), rng.choice(SIDES)) for s in range(max(4, cfg.requests // 2))]
    out, fresh = [], 1_000
    for _ in range(cfg.requests):
        items = []
        for _ in range(rng.randint(*cfg.images_per_request)):
            if rng.random() < cfg.repeated_fraction:
                items.append(rng.choice([s for s in shared if s not in items]))
            else:
                items.append((fresh, rng.choice(SIDES), rng.choice(SIDES)))
                fresh += 1
        out.append(items)
    return out


def build(name: str, cfg: WorkloadConfig, model: str) -> list[BenchRequest]:
    rng, urls = random.Random(cfg.seed + 1), {}
    out = []
    for i, slots in enumerate(image_slots(name, cfg)):
        images = [urls.setdefault(s, image(*s)) for s in slots]
        body = _body(model, _text(rng, i, cfg.input_len), images, cfg)
        out.append(BenchRequest("/v1/chat/completions", body, cfg.input_len, cfg.output_len))
    return out
