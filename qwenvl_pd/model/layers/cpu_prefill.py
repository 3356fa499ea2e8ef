"""Prefill and vision-tower attention in bf16 on CPU (csrc/prefill_attention.c).

Without AMX, torch's CPU flash kernel runs bf16 at about the float32 GEMM rate; this kernel
scores on the bf16 dot instruction (AVX512-BF16), about twice as fast on long prompts and
full-attention vision blocks, and reads a paged cache through the block table instead of
gathering it. float32 and CPUs without the instruction keep torch's SDPA.
"""
import ctypes
import functools

import torch

from qwenvl_pd.model.layers import cpu_kernels


_ONE_BLOCK = torch.zeros(1, dtype=torch.int64)  # the table of keys held as one block


class _Args(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_void_p) for n in ("q", "k", "v", "out", "table")],
                *[(n, ctypes.c_int64) for n in ("q_row", "q_head", "o_row", "o_head", "k_block",
                                                "k_head", "k_token", "v_block", "v_head",
                                                "v_token")],
                *[(n, ctypes.c_int) for n in ("n", "ctx", "heads", "kv_heads", "dim",
                                              "block_size", "causal", "threads")],
                ("scale", ctypes.c_float)]


def supports(q: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and cpu_kernels.enabled()
            and _runs_here())


def paged(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, ctx: int,
          scale: float) -> torch.Tensor | None:
    """Causal: q [n, heads, d] are the last n of ctx positions, whose K/V (these n included) are
    in cache [2, blocks, kv_heads, block_size, d] at the blocks of table. -> [n, heads, d], or
    None where the kernel declines the shapes."""
    k, v = cache[0], cache[1]  # [blocks, kv_heads, block_size, d]
    return _run(q, (k, k.stride()[:3]), (v, v.stride()[:3]), cpu_kernels.int64(table), ctx,
                cache.shape[2], cache.shape[3], True, scale)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Every query sees every key: q [heads, n, d], k, v [kv_heads, n, d] -> [n, heads, d]."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    n = k.shape[1]
    # all n keys as one block: block stride 0, then the head and token strides
    return _run(q.transpose(0, 1), (k, (0, *k.stride()[:2])), (v, (0, *v.stride()[:2])),
                _ONE_BLOCK, n, k.shape[0], n, False, scale)


def _run(q, keys, values, table, ctx, kv_heads, block_size, causal, scale) -> torch.Tensor | None:
    """q [n, heads, d] of any strides; keys, values: (tensor, (block, head, token) strides)."""
    (k, k_strides), (v, v_strides) = keys, values
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    n, heads, d = q.shape
    out = torch.empty(n, heads, d, dtype=q.dtype)
    args = _Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), table.data_ptr(),
                 q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_strides, *v_strides,
                 n, ctx, heads, kv_heads, d, block_size, int(causal), torch.get_num_threads(),
                 scale)
    return out if _kernel()(ctypes.byref(args)) == 0 else None


@functools.cache
def _kernel():
    return cpu_kernels.function("prefill_attention", _Args)


@functools.cache
def _runs_here() -> bool:
    """Built without the bf16 dot instruction the kernel declines every call: probe once."""
    if _kernel() is None:
        return False
    x = torch.zeros(1, 1, 2, dtype=torch.bfloat16)
    return dense(x, x, x, 1.0) is not None

