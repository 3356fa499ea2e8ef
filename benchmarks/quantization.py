"""Float32 vs msModelSlim W8A8 (static and dynamic) on one checkpoint: resident bytes of the
decoder's linear weights and decode throughput.

    python benchmarks/quantization.py [--arch qwen2_5_vl|qwen3_vl_moe] [--output-tokens 32]

Builds random-weight checkpoints (hidden 1024, 4 layers) once under .cache/bench-quant. Bytes
count what the loaded model holds for the projections (and MoE experts): float32 weights, or
int8 weights plus their scales, offsets and biases. Expect about 1/4 of float32.
"""
import argparse
import time
from pathlib import Path

import torch

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.layers.linear import Linear, PackedWeights
from qwenvl_pd.model.layers.moe import Experts
from qwenvl_pd.model.quant.experts import QuantExperts
from qwenvl_pd.model.quant.linear import QuantLinear
from qwenvl_pd.model.tiny import make_tiny

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, mrope_section=[8, 12, 12])
MOE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
           num_key_value_heads=4, head_dim=64, moe_intermediate_size=512, mrope_section=[12, 10, 10])


def linear_bytes(model) -> int:
    """Bytes the decoder's projections and experts hold, packed or not."""
    total, seen = 0, set()
    for module in model.language_model().modules():
        for value in vars(module).values():  # the packed q/k/v and gate/up live off-module
            if isinstance(value, PackedWeights) and id(value) not in seen:
                seen.add(id(value))
                total += value.dense().numel() * value.dense().element_size()
        if isinstance(module, (QuantLinear, Experts, Linear)):  # packed linears hold None here
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def tok_per_s(llm: LLM, tokens: int) -> float:
    prompt = {"prompt": "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    llm.generate([prompt] * 4, params)
    return 4 * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl_moe"])
    ap.add_argument("--output-tokens", type=int, default=32)
    args = ap.parse_args()
    root, sizes = Path(".cache/bench-quant"), MOE if args.arch == "qwen3_vl_moe" else MODEL
    rows = []
    for quant in ("none", "w8a8", "w8a8_dynamic"):
        path = root / f"{args.arch}-{quant}"
        if not (path / "config.json").is_file():
            make_tiny(args.arch, path, text_overrides=sizes, quantize=quant)
        llm = LLM(model=str(path), max_model_len=1024)
        rows.append((quant, linear_bytes(llm.model), tok_per_s(llm, args.output_tokens)))
        del llm
    print(f"{args.arch}, {torch.get_num_threads()} threads, 4 requests x {args.output_tokens} tokens")
    print(f"{'weights':<14}{'linear MiB':>12}{'vs float':>10}{'tok/s':>10}")
    for quant, nbytes, tps in rows:
        print(f"{quant:<14}{nbytes / 2**20:>12.1f}{nbytes / rows[0][1]:>10.3f}{tps:>10.1f}")


if __name__ == "__main__":
    main()
