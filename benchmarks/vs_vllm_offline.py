"""One offline `LLM.generate` timing, run by benchmarks/vs_vllm.py in either venv (vLLM's or
ours): the same seeded requests for both, built here from a workload given as JSON.

    python vs_vllm_offline.py --engine vllm|ours --model DIR --workloads '{"short": {"prompts": 4, ...}}'

Starts the engine once, then prints one line per workload, RESULT NAME {JSON}: output tokens,
seconds for the whole batch, and seconds for the same batch prefilled only (max_tokens 1, other prompts of the same lengths, so no prefix-cache hit),
from which the roofline fractions are derived. vLLM's LLM must be built under __main__ (its
workers start by spawn).
"""
from __future__ import annotations

import argparse
import json
import random
import time

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PREFILL_SEED = 1  # the prefill-only pass's requests (the timed run's are seed 0)


def requests(w: dict, seed: int) -> list[dict]:
    """w: prompts, input_lo, input_hi (text tokens), images_lo/hi, sizes (px) -> prompt dicts."""
    rng = random.Random(seed)
    out = []
    for _ in range(w["prompts"]):
        n = rng.randint(w["input_lo"], w["input_hi"])
        if not w.get("images_hi"):
            out.append({"prompt_token_ids": [rng.randrange(1000, 150000) for _ in range(n)]})
            continue
        k = rng.randint(w["images_lo"], w["images_hi"])
        images = [_image(rng.choice(w["sizes"]), rng) for _ in range(k)]
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        prompt = f"<|im_start|>user\n{IMAGE * k}{text}<|im_end|>\n<|im_start|>assistant\n"
        out.append({"prompt": prompt, "multi_modal_data": {"image": images}})
    return out


WORDS = "the a cat dog sea sky red blue runs over under house tree river light dark".split()


def _image(px: int, rng: random.Random):
    import numpy as np
    from PIL import Image
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (px, px, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _engine(args, images: int):
    limit = {"image": images, "video": 0}
    if args.engine == "vllm":  # the limits also spare vLLM's start-up profiling of unused media
        from vllm import LLM
        return LLM(model=args.model, max_model_len=args.max_model_len, limit_mm_per_prompt=limit,
                   seed=0, dtype=args.dtype)
    from qwenvl_pd import LLM
    return LLM(model=args.model, max_model_len=args.max_model_len, limit_mm_per_prompt=limit,
               dtype=args.dtype, kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)))


def _params(engine: str, max_tokens: int):
    if engine == "vllm":
        from vllm import SamplingParams
    else:
        from qwenvl_pd import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _timed(llm, engine: str, reqs: list[dict], max_tokens: int) -> tuple[float, int, list[int]]:
    """-> (seconds, output tokens, each prompt's length in tokens, images expanded)"""
    start = time.perf_counter()
    outs = llm.generate(reqs, _params(engine, max_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs), [len(o.prompt_token_ids) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["vllm", "ours"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--workloads", required=True, help="JSON: name -> workload (see requests())")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    workloads = json.loads(args.workloads)
    t0 = time.perf_counter()
    llm = _engine(args, max(w.get("images_hi", 0) for w in workloads.values()))
    startup = time.perf_counter() - t0
    for name, w in workloads.items():
        _timed(llm, args.engine, requests({**w, "prompts": 1}, 99), 4)  # warm-up (first-call costs)
        prefill_s, _, prefill_lens = _timed(llm, args.engine, requests(w, PREFILL_SEED), 1)
        total_s, tokens, lens = _timed(llm, args.engine, requests(w, 0), w["output"])
        print(f"RESULT {name} " + json.dumps({
            "startup_s": startup, "prefill_s": prefill_s, "prefill_lens": prefill_lens, "total_s": total_s,
            "lens": lens, "output_tokens": tokens, "tok_s": tokens / total_s}), flush=True)


if __name__ == "__main__":
    main()
