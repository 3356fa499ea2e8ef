"""Output tokens/s of the engine against transformers' generate, sequential and batched.

    python benchmarks/engine_vs_transformers.py [--model DIR | --tiny] [--requests 32]

Without --model it builds a small random-weight Qwen2.5-VL (hidden 1024, 12 layers) once into
.cache/bench-small; --tiny builds the tiny one instead (hidden 128, 3 layers, the real
vocabulary) into .cache/bench-tiny, whose forward is cheap enough that the engine's own
bookkeeping shows. The workload: prompts of 16-512 tokens, half with an image, 8-128 output
tokens, all greedy with ignore_eos so every system produces the same token counts.
"""
import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.tiny import make_tiny

SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, mrope_section=[8, 12, 12])
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def workload(n: int, tokenizer, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = np.arange(1000, 100000)
    requests, params = [], []
    for i in range(n):
        body = tokenizer.decode(rng.choice(vocab, size=int(rng.integers(16, 480))).tolist())
        req = {"prompt": f"<|im_start|>user\n{IMG if i % 2 else ''}{body}<|im_end|>\n<|im_start|>assistant\n"}
        if i % 2:
            side = int(rng.integers(2, 7)) * 28
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            req["multi_modal_data"] = {"image": [Image.fromarray(pixels)]}
        requests.append(req)
        params.append(SamplingParams(max_tokens=int(rng.integers(8, 129)), temperature=0, ignore_eos=True))
    return requests, params


def hf_inputs(prompts, pad_id: int):
    """Left-padded batch for transformers' generate."""
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p.token_ids):] = torch.tensor(p.token_ids)
        mask[row, width - len(p.token_ids):] = 1
    kw = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == 151655).long()}
    images = [p.images for p in prompts if p.images is not None]
    if images:
        kw["pixel_values"] = torch.cat([im.pixel_values for im in images])
        kw["image_grid_thw"] = torch.cat([im.image_grid_thw for im in images])
    return kw


def time_engine(llm: LLM, requests, params):
    """-> (seconds, output tokens, share outside the forward at batch 32, seconds in steps that
    carried prompt tokens, rows of each decode-only step)."""
    step_time, forward_time, prefill_time, decode_rows = [0.0], [0.0], [0.0], []
    model, engine = llm.model, llm.engine
    inner_forward, inner_logits, inner_step = model.forward, model.compute_logits, engine.step

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            forward_time[0] += time.perf_counter() - t
            return out
        return wrapper

    timed_forward = timed(inner_forward)

    def timed_step():
        running, waiting = engine.scheduler.running, engine.scheduler.waiting
        decoding_32 = len(running) == 32 and not waiting
        prefilling = bool(waiting) or any(s.num_computed < s.prompt_len for s in running)
        t, f = time.perf_counter(), forward_time[0]
        out = inner_step()
        if prefilling:
            prefill_time[0] += time.perf_counter() - t
        else:
            decode_rows.append(len(running))
        if decoding_32:
            step_time[0] += time.perf_counter() - t
            timed_forward.batch32 += forward_time[0] - f
        return out

    timed_forward.batch32 = 0.0
    model.forward, model.compute_logits, engine.step = timed_forward, timed(inner_logits), timed_step
    t = time.perf_counter()
    outs = llm.generate(requests, params)
    elapsed = time.perf_counter() - t
    model.forward, model.compute_logits, engine.step = inner_forward, inner_logits, inner_step
    outside = 1 - timed_forward.batch32 / step_time[0] if step_time[0] else float("nan")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return elapsed, tokens, outside, prefill_time[0], decode_rows


def gemm_gflops() -> float:
    """The machine's fp32 GEMM rate now: shared machines drift, so it is printed with the table."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 2816)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 * 1024 * 2816 / (time.perf_counter() - t) / 1e9


def read_gbps() -> float:
    """Memory read bandwidth now (a sum over 512 MB): what a small-batch decode step is bound by."""
    x = torch.ones(1 << 27)
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def engine_floor(ref, prompt_tokens: int, decode_rows: list[int], gflops: float, gbps: float):
    """A roofline lower bound for the engine on this workload: prompt GEMMs at the best measured
    GEMM rate, and each decode-only step at least one read of the decoder and lm_head weights, or
    its GEMMs if those take longer. Vision, attention and sampling are left out: a floor."""
    layers = sum(p.numel() for p in ref.model.language_model.layers.parameters())
    decode = layers + ref.lm_head.weight.numel()
    prompt_s = prompt_tokens * 2 * layers / (gflops * 1e9)
    decode_s = sum(max(decode * 4 / (gbps * 1e9), rows * 2 * decode / (gflops * 1e9))
                   for rows in decode_rows)
    return prompt_s, decode_s


def decode_gemm_seconds(model, decode_rows: list[int]) -> float:
    """The engine's own linears (packed q/k/v, o_proj, gate/up, down_proj, lm_head) timed at each
    decode-only step's row count: what those steps would take if everything but the GEMMs were
    free, with the GEMMs this machine's libraries give at these small row counts."""
    text = model.language_model()
    if not all(hasattr(layer.mlp, "gate_up") for layer in text.layers):
        return float("nan")  # MoE layers: expert GEMMs depend on the routing, not timed here
    calls = [(lin, d) for layer in text.layers for lin, d in (
        (layer.self_attn.qkv, layer.self_attn.q_proj.in_features),
        (layer.self_attn.o_proj, layer.self_attn.o_proj.in_features),
        (layer.mlp.gate_up, layer.mlp.gate_proj.in_features),
        (layer.mlp.down_proj, layer.mlp.down_proj.in_features))]
    calls.append((model.lm_head, model.lm_head.in_features))
    total = 0.0
    with torch.inference_mode():
        for rows, steps in Counter(decode_rows).items():
            inputs = [(lin, torch.randn(rows, d)) for lin, d in calls]
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for lin, x in inputs:
                    lin(x)
                best = min(best, time.perf_counter() - t)
            total += best * steps
    return total


def time_hf_sequential(ref, prompts, params):
    t = time.perf_counter()
    for p, sp in zip(prompts, params):
        with torch.inference_mode():
            ref.generate(**hf_inputs([p], 151643), max_new_tokens=sp.max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=151643)
    return time.perf_counter() - t


def time_hf_batched(ref, prompts, params):
    t = time.perf_counter()
    with torch.inference_mode():
        ref.generate(**hf_inputs(prompts, 151643), max_new_tokens=max(p.max_tokens for p in params),
                     do_sample=False, eos_token_id=None, pad_token_id=151643)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tiny", action="store_true", help="the tiny checkpoint (ignored with --model)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--skip-sequential", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = args.model or (".cache/bench-tiny" if args.tiny else ".cache/bench-small")
    if not args.model and not Path(path, "config.json").exists():
        make_tiny("qwen2_5_vl", path, text_overrides=None if args.tiny else SMALL)
    llm = LLM(model=path, max_model_len=4096, max_num_batched_tokens=2048)
    requests, params = workload(args.requests, llm.tokenizer)
    llm.generate(requests[:2], params[:2])  # warm-up
    rates = [gemm_gflops()]  # before each system and at the end: shared machines drift
    ours, tokens, outside, prefilling, decode_rows = time_engine(llm, requests, params)
    gbps = read_gbps()
    decode_gemms = decode_gemm_seconds(llm.model, decode_rows)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [llm.inputs.process(r) for r in requests]
    rates.append(gemm_gflops())
    batched = time_hf_batched(ref, prompts, params)
    rates.append(gemm_gflops())
    sequential = float("nan") if args.skip_sequential else time_hf_sequential(ref, prompts, params)
    rates.append(gemm_gflops())
    rows = [("qwenvl-pd engine", ours), ("transformers batched (padded)", batched),
            ("transformers sequential", sequential)]
    print(f"\n{args.requests} requests, {tokens} output tokens, torch threads {torch.get_num_threads()}")
    print("fp32 GEMM GFLOPS before engine, batched, sequential, and at the end: "
          + ", ".join(f"{r:.0f}" for r in rates))
    print(f"{'system':32} {'seconds':>9} {'out tok/s':>10} {'engine speed-up':>16}")
    for name, secs in rows:
        print(f"{name:32} {secs:9.2f} {tokens / secs:10.1f} {secs / ours:15.2f}x")
    print(f"share of batch-32 decode step time outside the model forward (layers + lm_head): {outside:.1%}")
    # every system computes the same prompt tokens; batching only shortens the decode part
    print(f"engine steps that carried prompt tokens: {prefilling:.2f} s; decode-only steps: "
          f"{ours - prefilling:.2f} s; even a free decode would stop at "
          f"{sequential / prefilling:.1f}x over sequential")
    prompt_s, decode_s = engine_floor(ref, sum(len(p.token_ids) for p in prompts), decode_rows,
                                      max(rates), gbps)
    print(f"roofline floor of the engine ({max(rates):.0f} GFLOPS, {gbps:.1f} GB/s read): prompt "
          f"GEMMs {prompt_s:.2f} s + {len(decode_rows)} decode-only steps {decode_s:.2f} s = "
          f"{prompt_s + decode_s:.2f} s, so at most {sequential / (prompt_s + decode_s):.1f}x "
          f"over sequential")
    print(f"the engine's linears alone at the decode-only steps' row counts: {decode_gemms:.2f} s "
          f"(of {ours - prefilling:.2f} s); with prompt GEMMs at the floor, at most "
          f"{sequential / (prompt_s + decode_gemms):.1f}x over sequential")


if __name__ == "__main__":
    main()
