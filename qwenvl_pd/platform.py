"""Decides once where the model runs (npu (torch_npu present) > cuda > cpu) and in which dtype."""
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16"}
# the /proc/cpuinfo flags under which a CPU computes a half type natively (oneDNN uses them);
# without them bf16 matmuls are emulated and run far slower than float32
CPU_NATIVE = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def detect_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  registers the npu device
        if torch.npu.is_available():
            return torch.device("npu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def choose_dtype(requested: str | None, checkpoint: str | None, device_type: str,
                 cpu_flags: frozenset[str] = frozenset()) -> tuple[str, str]:
    """vLLM's "auto": the checkpoint's dtype where the device computes it natively, else
    float32; an explicit dtype wins. -> (dtype name, the reason, for the start-up log)."""
    if requested and requested != "auto":
        return canonical_dtype(requested), "requested"
    ckpt = canonical_dtype(str(checkpoint or "float32").removeprefix("torch."))
    if ckpt == "float32" or device_type != "cpu":
        return ckpt, f"auto: the checkpoint's {ckpt}"
    if cpu_flags & set(CPU_NATIVE[ckpt]):
        return ckpt, f"auto: the checkpoint's {ckpt}, native on this CPU"
    return "float32", (f"auto: the checkpoint is {ckpt}, but this CPU has none of "
                       f"{', '.join(CPU_NATIVE[ckpt])}")


def canonical_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags as Linux reports them (empty where there is no procfs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def default_dtype(device: torch.device, requested: str | None = None,
                  checkpoint: str | None = None) -> torch.dtype:
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    name, why = choose_dtype(requested, checkpoint, device.type, flags)
    log.info("dtype %s on %s (%s)", name, device.type, why)
    return getattr(torch, name)


def graph_api(device: torch.device):
    """(graph class, capture context factory) for decode graphs, or None where there are none."""
    if device.type == "cuda":
        return torch.cuda.CUDAGraph, torch.cuda.graph
    if device.type == "npu":
        return torch.npu.NPUGraph, torch.npu.graph
    return None
