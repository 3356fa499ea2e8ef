"""vLLM's command line on `serve`, `prefill` and `decode`, so the guides' `vllm serve` lines run
with `vllm` replaced: the model as a positional argument, `--flag_name` spelled either way, the
engine flags vLLM's guides use, flags that change nothing here accepted with one logged line, and
multi-node data parallelism answered with the commands that deploy the same here."""
from __future__ import annotations

import argparse
import json
import logging
import shlex

log = logging.getLogger("qwenvl_pd.cli")

DTYPES = ("auto", "bfloat16", "float16", "float32")
MODALITIES = ("image", "video")
# accepted, logged once: why each changes nothing here
NO_EFFECT = {
    "trust_remote_code": "--trust-remote-code has no effect: Qwen-VL's model code is built in, no "
                         "checkpoint code is ever run",
    "async_scheduling": "--async-scheduling has no effect: each step is scheduled once the previous "
                        "step's tokens are known; the output is the same either way",
    "api_server_count": "--api-server-count has no effect: one proxy process serves the API",
}
# --additional-config keys this project knows (vLLM-Ascend's), and why each changes nothing
ADDITIONAL_CONFIG = {
    "enable_weight_nz_layout": "an Ascend weight layout (FRACTAL_NZ) for its matmuls; weights keep "
                               "their checkpoint layout here",
}


def normalize_argv(argv: list[str]) -> list[str]:
    """`--max_model_len 16384` -> `--max-model-len 16384`: vLLM takes either spelling of a flag."""
    out = []
    for a in argv:
        if a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def _fraction(v: str) -> float:
    x = float(v)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return x


def limits(v: str) -> dict[str, int]:
    """vLLM's --limit-mm-per-prompt: JSON ('{"image": 10}') or image=10,video=2."""
    try:
        raw = json.loads(v) if v.lstrip().startswith("{") else {
            k.strip(): int(n) for k, _, n in (item.partition("=") for item in v.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected JSON like '{{\"image\": 10}}' or image=10, got {v!r}")
    unknown = [k for k in raw if k not in MODALITIES]
    if unknown or not all(type(n) is int and n >= 0 for n in raw.values()):
        raise argparse.ArgumentTypeError(f"modalities are {MODALITIES}, counts non-negative integers; "
                                         f"got {v!r}")
    return raw


def additional_config(v: str) -> dict:
    try:
        cfg = json.loads(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--additional-config must be a JSON object, got {v!r}")
    if not isinstance(cfg, dict):
        raise argparse.ArgumentTypeError(f"--additional-config must be a JSON object, got {v!r}")
    unknown = sorted(set(cfg) - set(ADDITIONAL_CONFIG))
    if unknown:
        raise argparse.ArgumentTypeError(f"--additional-config key(s) {', '.join(unknown)} are not "
                                         f"known here (known: {', '.join(ADDITIONAL_CONFIG)})")
    return cfg


def add_model_arg(p) -> None:
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the checkpoint (or --model)")


def add_engine_args(p, hidden: bool = False) -> None:
    """The engine flags vLLM's guides use, honoured by every role that runs an engine."""
    def h(text: str) -> str:
        return argparse.SUPPRESS if hidden else text
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=h("weights' and activations' dtype"))
    p.add_argument("--max-num-seqs", type=int, default=256, help=h("requests in one batch at most"))
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="no_prefix_caching",
                   action="store_true", help=h("turn the prefix cache off"))
    p.add_argument("--enable-prefix-caching", dest="no_prefix_caching", action="store_false",
                   help=h("the default"))
    p.add_argument("--seed", type=int, default=0, help=h("the engine's sampling seed"))
    p.add_argument("--step-fill-tokens", type=int, help=h(
        "prompts join a step only while it holds fewer tokens than this (default: 256 on a CPU prefill "
        "node, where one prompt already runs the GEMMs at full rate and a step's prompts all wait for "
        "its end; the whole --max-num-batched-tokens elsewhere)"))
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=None, help=h(
        "on an accelerator, the share of device memory this instance's weights and KV pool take "
        "(the KV pool gets what the weights leave); overrides --kv-cache-gib there"))
    p.add_argument("--limit-mm-per-prompt", type=limits, default=None, metavar="JSON",
                   help=h('e.g. \'{"image": 10, "video": 2}\' (sets --limit-images / --limit-videos)'))


def add_accepted_args(p) -> None:
    """Flags that change nothing here: accepted, each logged once (log_no_effect)."""
    p.add_argument("--trust-remote-code", action="store_true", help="no effect (logged)")
    p.add_argument("--async-scheduling", action="store_true", help="no effect (logged)")
    p.add_argument("--additional-config", type=additional_config, default={}, metavar="JSON",
                   help=f"vLLM-Ascend's extras; known keys: {', '.join(ADDITIONAL_CONFIG)}")


def resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--model and the positional MODEL are one argument (vLLM's)."""
    pos = getattr(args, "model_arg", None)
    if pos and args.model and pos != args.model:
        parser.error(f"the model is given twice: {pos!r} and --model {args.model!r}")
    args.model = args.model or pos
    limits_ = getattr(args, "limit_mm_per_prompt", None) or {}
    if "image" in limits_:
        args.limit_images = limits_["image"]
    if "video" in limits_:
        args.limit_videos = limits_["video"]


def log_no_effect(args: argparse.Namespace) -> None:
    for name, why in NO_EFFECT.items():
        if getattr(args, name, None):
            log.warning(why)
    for key in getattr(args, "additional_config", {}) or {}:
        log.warning("--additional-config %s has no effect: %s", key, ADDITIONAL_CONFIG[key])


def add_data_parallel_args(p) -> None:
    """vLLM's data parallelism: on one machine it is more instances (serve's --num-prefill and
    --num-decode); over several machines each runs its own instances behind one proxy."""
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="N engines: N prefill + N decode")
    p.add_argument("--data-parallel-size-local", type=int, help="only the whole of -dp here is served")
    p.add_argument("--data-parallel-address", help=argparse.SUPPRESS)
    p.add_argument("--data-parallel-rpc-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-parallel-start-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--api-server-count", type=int, help="no effect (logged): one proxy serves the API")


def data_parallel_instances(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """How many prefill and how many decode instances -dp asks for on this machine; raises
    ValueError with the commands for a deployment spread over machines."""
    size, local = args.data_parallel_size, args.data_parallel_size_local
    spread = args.headless or args.data_parallel_start_rank or (local is not None and local != size)
    if size < 1 or not spread:
        return max(size, 1)
    raise ValueError(multi_node_message(args, parser))


# (flag, dest): add_engine_args' flags, then the others of serve's that a node takes as they are
_ENGINE_FLAGS = (("--dtype", "dtype"), ("--max-num-seqs", "max_num_seqs"),
                 ("--no-enable-prefix-caching", "no_prefix_caching"), ("--seed", "seed"),
                 ("--step-fill-tokens", "step_fill_tokens"))
_NODE_FLAGS = _ENGINE_FLAGS + (
    ("--max-model-len", "max_model_len"), ("--tensor-parallel-size", "tensor_parallel_size"),
    ("--enable-expert-parallel", "enable_expert_parallel"), ("--quantization", "quantization"),
    ("--max-num-batched-tokens", "max_num_batched_tokens"), ("--kv-cache-gib", "kv_cache_gib"),
    ("--device", "device"))


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser, pairs) -> list[str]:
    out = []
    for flag, dest in pairs:
        v = getattr(args, dest, None)
        if v is None or v is False or v == parser.get_default(dest):
            continue
        out += [flag] if v is True else [flag, str(v)]
    return out


def engine_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, share: float | None,
                 with_limits: bool = True) -> list[str]:
    """add_engine_args' flags as serve got them, for the instances it starts; `share` is each
    one's --gpu-memory-utilization."""
    out = _given(args, parser, _ENGINE_FLAGS)
    if share:
        out += ["--gpu-memory-utilization", repr(share)]
    if with_limits and args.limit_mm_per_prompt:
        out += ["--limit-mm-per-prompt", json.dumps(args.limit_mm_per_prompt)]
    return out


def node_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The flags given to serve (away from their defaults) that a node takes too."""
    share = args.gpu_memory_utilization and args.gpu_memory_utilization / 2  # prefill + decode
    return _given(args, parser, _NODE_FLAGS[len(_ENGINE_FLAGS):]) + engine_flags(args, parser, share)


def multi_node_message(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    flags = shlex.join(node_flags(args, parser))
    model = shlex.quote(args.model or "MODEL")
    name = args.served_model_name or args.model or "MODEL"
    size = args.data_parallel_size
    nodes = ", ".join(f"NODE{i}" for i in range(size))
    return (f"--data-parallel-size {size} over several machines is not how this server spreads: each "
            f"machine runs its own prefill and decode instances and one proxy fronts them all. The "
            f"same deployment here, on each machine NODEi of {nodes}:\n"
            f"  qwenvl-pd prefill {model} --host NODEi --port 50051 {flags}\n"
            f"  qwenvl-pd decode {model} --host NODEi --port 50052 {flags}\n"
            f"and on one of them:\n"
            f"  qwenvl-pd proxy --port {args.port} --served-model-name {shlex.quote(name)} "
            f"--prefill {','.join(f'NODE{i}:50051' for i in range(size))} "
            f"--decode {','.join(f'NODE{i}:50052' for i in range(size))}\n"
            f"(every role with the same --cluster-secret-file). On one machine, -dp {size} alone "
            f"runs {size} prefill and {size} decode instances.")
