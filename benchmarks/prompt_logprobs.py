"""What prompt_logprobs cost a prefill: the lm_head and log-softmax at every prompt position.

    python benchmarks/prompt_logprobs.py [--lens 256 1024 4096] [--k 0 5 20] [--chunk 512]

The whole offline engine on a tiny checkpoint (hidden 128, 3 layers, the real 152k vocabulary,
built once into .cache/bench-tiny), so the vocabulary-wide work dominates as it does on a small
model; on a 7B model the decoder layers weigh far more. Each row prefills one prompt of random
words (max_tokens 1, greedy, no prefix cache) without prompt logprobs and with each k, and prints
the median of 3 runs and the extra time per prompt token.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.tiny import make_tiny

TINY = ".cache/bench-tiny"
WORDS = "the sea sky red blue cat dog runs over under a small large house tree river".split()


def prompt(n_words: int, seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n_words))


def timed(llm: LLM, text: str, k: int | None) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(text, params)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[256, 1024, 4096], help="prompt words")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 5, 20])
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    args = ap.parse_args()
    if not Path(TINY, "config.json").exists():
        make_tiny("qwen2_5_vl", TINY)
    llm = LLM(TINY, max_model_len=max(args.lens) * 2 + 64, max_num_batched_tokens=args.chunk,
              enable_prefix_caching=False)
    print(f"{'tokens':>7} {'plain ms':>9} " + " ".join(f"{f'k={k} ms':>9} {'us/tok':>7}" for k in args.k))
    for n in args.lens:
        text = prompt(n, n)
        tokens = len(llm.tokenizer.encode(text))
        timed(llm, text, None)  # warm-up at this length
        plain = timed(llm, text, None)
        cells = []
        for k in args.k:
            t = timed(llm, text, k)
            cells.append(f"{t * 1e3:9.1f} {(t - plain) / tokens * 1e6:7.1f}")
        print(f"{tokens:7d} {plain * 1e3:9.1f} " + " ".join(cells))
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
