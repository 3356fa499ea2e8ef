"""Output tokens per second with and without a json_schema, the same batch of requests each way.

    python benchmarks/structured_outputs.py [--model DIR] [--batch 32] [--max-tokens 64]

Each run is one offline generate() over `batch` seeded requests; the grammar's cost is the token
bitmask each step (llguidance, on the CPU) and its application in the sampler. The schema is an
array of records, so a row can keep writing until max_tokens; a row whose JSON ends sooner
stops at its EOS, which is why tokens, not requests, are counted. Target: <= 15% slower.
"""
import argparse
import json
import tempfile
import time

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "array", "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "color"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "color": {"enum": ["red", "green", "blue", "cyan"]}}}}
PROMPT = "<|im_start|>user\nList some records as JSON.<|im_end|>\n<|im_start|>assistant\n"


def run(llm: LLM, batch: int, max_tokens: int, spec) -> tuple[float, int]:
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=spec)
              for i in range(batch)]
    llm.generate([PROMPT], params[:1])  # warm-up (and the grammar's tokenizer, built once)
    t = time.perf_counter()
    outs = llm.generate([PROMPT] * batch, params)
    seconds = time.perf_counter() - t
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a tiny random one)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or str(make_tiny("qwen2_5_vl", tempfile.mkdtemp() + "/tiny"))
    llm = LLM(model, max_model_len=1024)
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    rows = [("free", *run(llm, args.batch, args.max_tokens, None)),
            ("json_schema", *run(llm, args.batch, args.max_tokens, spec))]
    base = rows[0][2] / rows[0][1]
    print(f"batch {args.batch}, max_tokens {args.max_tokens}")
    print(f"{'':12} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs free':>8}")
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(f"{name:12} {tokens:7d} {seconds:8.2f} {rate:8.1f} {rate / base - 1:+8.1%}")


if __name__ == "__main__":
    main()
