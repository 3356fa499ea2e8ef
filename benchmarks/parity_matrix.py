"""Greedy parity with transformers, the whole matrix in one table: family x dtype (float32,
bfloat16) x tensor parallel (1, 2) x input (text, one image, two images, video). Each row's
tokens are LLM.generate's (TP 2: two gloo ranks); the reference is transformers' greedy run in
the same dtype on the same checkpoint (make_tiny, weights in that dtype), computed once per
family and dtype. float32 must be equal token for token; bf16 may part at a near-tie, where
transformers' own gap between its token and ours is within the noise bf16 makes in its own
prefill logits (qwenvl_pd.model.parity, the rule the parity tests use).

    PYTHONPATH=$PWD python benchmarks/parity_matrix.py [--families qwen3_vl ...] [--tokens 32]

Prints PASS/FAIL per row and an overall line; exits 1 on any FAIL.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.parity import CASES, case_request, first_difference, greedy, near_tie_failure, own_error
from qwenvl_pd.model.tiny import ARCHS, make_tiny

DTYPES = ("float32", "bfloat16")
TPS = (1, 2)


def references(path: Path, dtype: str, prompts: dict, tokens: int) -> dict:
    """case -> (transformers' Greedy in dtype, the noise a near-tie may be within)."""
    load = transformers.AutoModelForImageTextToText.from_pretrained
    ref = load(path, dtype=getattr(torch, dtype)).eval()
    ref32 = load(path, dtype=torch.float32).eval() if dtype != "float32" else None
    # float32 is the truth itself: no noise, equal or FAIL
    return {case: (greedy(ref, p, tokens), own_error(ref, ref32, p)[1].abs().max().item() if ref32 else 0.0)
            for case, p in prompts.items()}


def ours(path: Path, dtype: str, tp: int, tokens: int) -> tuple[dict, dict]:
    """(case -> our greedy tokens, case -> the prompt our processor made); one batch of all cases."""
    llm = LLM(str(path), max_model_len=2048, dtype=dtype, tensor_parallel_size=tp)
    try:
        outs = llm.generate([case_request(c) for c in CASES],
                            SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        prompts = {c: llm.inputs.process(case_request(c)) for c in CASES}
    finally:
        llm.close()
    return {c: o.outputs[0].token_ids for c, o in zip(CASES, outs)}, prompts


def verdict(got: list[int], want, noise: float) -> tuple[bool, str]:
    failure = near_tie_failure(got, want, noise)
    if failure is not None:
        return False, failure
    first = first_difference(got, want.tokens)
    if first is None:
        return True, "equal"
    gap = (want.logits[first][want.tokens[first]] - want.logits[first][got[first]]).item()
    return True, f"near-tie at token {first} (gap {gap:.3f} <= noise {noise:.3f})"


def family_rows(arch: str, root: Path, tokens: int) -> list[tuple]:
    rows = []
    for dtype in DTYPES:
        path = make_tiny(arch, root / f"{arch}-{dtype}", dtype=dtype)
        runs = {tp: ours(path, dtype, tp, tokens) for tp in TPS}
        refs = references(path, dtype, runs[1][1], tokens)
        for tp, (got, prompts) in runs.items():
            assert [p.token_ids for p in prompts.values()] == [p.token_ids for p in runs[1][1].values()]
            rows += [(arch, dtype, tp, case, *verdict(got[case], *refs[case])) for case in CASES]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=ARCHS, default=list(ARCHS))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    transformers.logging.disable_progress_bar()
    start, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.families:
            rows += family_rows(arch, Path(tmp), args.tokens)
    print("| family | dtype | TP | input | result | detail |\n|---|---|---|---|---|---|")
    for arch, dtype, tp, case, ok, detail in rows:
        print(f"| {arch} | {dtype} | {tp} | {case} | {'PASS' if ok else 'FAIL'} | {detail} |")
    failed = sum(not r[4] for r in rows)
    print(f"overall: {'PASS' if not failed else 'FAIL'} ({len(rows) - failed}/{len(rows)} rows, "
          f"{args.tokens} tokens each, {time.monotonic() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
