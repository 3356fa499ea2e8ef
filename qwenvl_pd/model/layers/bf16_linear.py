"""Linears in bf16 on the CPU's bf16 dot instruction (csrc/bf16_linear.c), for the few rows
of a decode step, where oneDNN's GEMM reaches about half the instruction's rate."""
import ctypes
import functools

import torch

from qwenvl_pd.model.layers import cpu_kernels

COLS = 32  # output columns per packed tile, as csrc/bf16_linear.c lays them out


class _Args(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_void_p) for n in ("x", "w", "bias", "out")],
                ("x_row", ctypes.c_int64), ("o_row", ctypes.c_int64),
                *[(n, ctypes.c_int) for n in ("m", "k", "n", "threads")]]


def available() -> bool:
    """Built and run once here (a CPU without the instruction builds a kernel that declines)."""
    return cpu_kernels.enabled() and _runs_here()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] bf16 -> [tiles, k / 2, COLS, 2]: output columns padded with zeros to whole tiles."""
    n, k = weight.shape
    tiles = -(-n // COLS)
    w = torch.zeros(tiles * COLS, k, dtype=torch.bfloat16)
    w[:n] = weight
    return w.view(tiles, COLS, k // 2, 2).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack's inverse: [n, k]."""
    tiles, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(tiles * COLS, 2 * pairs)[:n]


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
           ) -> torch.Tensor | None:
    """x [m, k] bf16 (rows of any stride, last axis contiguous) -> [m, n] bf16; None where the
    kernel declines (odd k)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    args = _Args(x.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(),
                 out.data_ptr(), x.stride(0), n, m, k, n, torch.get_num_threads())
    return out if _kernel()(ctypes.byref(args)) == 0 else None


@functools.cache
def _kernel():
    return cpu_kernels.function("bf16_linear", _Args)


@functools.cache
def _runs_here() -> bool:
    if _kernel() is None:
        return False
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    out = linear(torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16), pack(w), 1, None)
    return out is not None and out.item() == 11.0
