"""Decode steps replayed from graphs against the same steps run eagerly: same tokens, how fast.

    python benchmarks/decode_graphs.py [--model DIR] [--batches 1 8 32] [--max-tokens 128]

On CUDA/NPU it compares decode_graphs=auto (captured graphs) with off (eager); on CPU, where
nothing is captured, it compares the static padded path run eagerly with the dynamic one. Every
request is greedy with ignore_eos, so both runs produce the same number of tokens and the
token ids must be identical.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_transformers import SMALL, workload  # noqa: E402

from qwenvl_pd import LLM, SamplingParams  # noqa: E402
from qwenvl_pd.model.tiny import make_tiny  # noqa: E402
from qwenvl_pd.platform import detect_device, graph_api  # noqa: E402


def run(llm: LLM, requests, params) -> tuple[float, list[list[int]]]:
    llm.generate(requests[:1], params[:1])  # warm-up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    outs = llm.generate(requests, params)
    sync()
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    path = args.model or ".cache/bench-small"
    if not args.model and not Path(path, "config.json").exists():
        make_tiny("qwen2_5_vl", path, text_overrides=SMALL)
    device = detect_device()
    modes = ("off", "auto") if graph_api(device) is not None else ("off", "eager")
    engines = {m: LLM(model=path, max_model_len=2048, max_num_seqs=max(args.batches),
                      decode_graphs=m) for m in modes}
    print(f"device {device}; {modes[1]} vs {modes[0]}; {args.max_tokens} output tokens a request")
    print(f"{'batch':>6} {modes[0] + ' tok/s':>12} {modes[1] + ' tok/s':>14} {'speed-up':>9} {'same tokens':>12}")
    for batch in args.batches:
        requests, _ = workload(batch, engines[modes[0]].tokenizer, seed=batch)
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)] * batch
        (t_off, off), (t_on, on) = (run(engines[m], requests, params) for m in modes)
        tokens = batch * args.max_tokens
        print(f"{batch:6d} {tokens / t_off:12.1f} {tokens / t_on:14.1f} {t_off / t_on:8.2f}x "
              f"{'yes' if on == off else 'NO':>12}")


if __name__ == "__main__":
    main()
