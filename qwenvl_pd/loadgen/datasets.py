"""Synthetic request sets, vLLM bench style: `random` text and `random-mm` images + text.

The client has no tokenizer, so a prompt of N "tokens" is N words each of which is one token in
the Qwen (and most BPE) vocabularies; the server's usage reports the exact prompt length.
"""
from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

# common words that are single tokens (with their leading space) in byte-level BPE vocabularies
WORDS = ("the of and to in is was for on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up "
         "out them then she many some so these would other into has more her two like him see time "
         "could no make than first been its who now people my made over did down only way find use "
         "may water long little very after words called just where most know").split()


@dataclass(frozen=True)
class BenchRequest:
    endpoint: str  # "/v1/chat/completions" | "/v1/completions"
    body: dict
    input_len: int  # intended prompt text length in tokens (images not included)
    output_len: int


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _text(rng: random.Random, n: int, i: int) -> str:
    # a distinct lead word per request keeps prefix caches from making every prompt a hit
    return f"{i}:" + "".join(" " + rng.choice(WORDS) for _ in range(max(0, n - 2)))


def _image_url(rng: np.random.Generator, width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def build(name: str, num: int, input_len: int, output_len: int, range_ratio: float, model: str | None,
          image_size: tuple[int, int] = (448, 448), images_per_request: int = 1, seed: int = 0,
          endpoint: str | None = None, ignore_eos: bool = False) -> list[BenchRequest]:
    if name not in ("random", "random-mm"):
        raise ValueError(f"unknown dataset {name!r}: random | random-mm")
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    chat = (endpoint or ("/v1/chat/completions" if name == "random-mm" else "/v1/completions")).endswith("chat/completions")
    if name == "random-mm" and not chat:
        raise ValueError("random-mm needs the chat endpoint (/v1/chat/completions)")
    out = []
    for i in range(num):
        n_in, n_out = _lengths(rng, input_len, range_ratio), _lengths(rng, output_len, range_ratio)
        text = _text(rng, n_in, i)
        body: dict = {"max_tokens": n_out, "temperature": 0, "stream": True,
                      "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if ignore_eos:
            body["ignore_eos"] = True
        if chat:
            parts = [{"type": "image_url", "image_url": {"url": _image_url(np_rng, *image_size)}}
                     for _ in range(images_per_request if name == "random-mm" else 0)]
            body["messages"] = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
        else:
            body["prompt"] = text
        out.append(BenchRequest("/v1/chat/completions" if chat else "/v1/completions", body, n_in, n_out))
    return out
