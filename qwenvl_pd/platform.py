"""Decides once where the model runs: npu (torch_npu present) > cuda > cpu."""
import importlib.util

import torch


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


def default_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    # bf16 matmul on CPUs without AMX is two orders of magnitude slower than fp32
    if requested and requested != "auto":
        return getattr(torch, requested)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def graph_api(device: torch.device):
    """(graph class, capture context factory) for decode graphs, or None where there are none."""
    if device.type == "cuda":
        return torch.cuda.CUDAGraph, torch.cuda.graph
    if device.type == "npu":
        return torch.npu.NPUGraph, torch.npu.graph
    return None

