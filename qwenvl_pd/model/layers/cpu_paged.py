"""Decode attention on CPU that reads the paged KV cache in place (csrc/paged_decode.c).

The torch reference copies every row's whole context out of the cache each layer and step, then
runs SDPA over the copy; this kernel reads K and V once, through the block tables.
"""
import ctypes
import functools

import torch

from qwenvl_pd.model.layers import cpu_kernels

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class _Args(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("tables", ctypes.c_void_p), ("lens", ctypes.c_void_p),
                *[(n, ctypes.c_int64) for n in ("q_row", "q_head", "o_row", "o_head", "k_block",
                                                "k_head", "k_token", "table_row")],
                *[(n, ctypes.c_int) for n in ("rows", "heads", "kv_heads", "dim", "block_size",
                                              "bf16", "threads")],
                ("scale", ctypes.c_float)]


def available() -> bool:
    """Read each call, so a benchmark can compare both paths in one process."""
    return cpu_kernels.enabled() and _kernel() is not None


def supports(q: torch.Tensor, cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in DTYPES and cache.dtype == q.dtype
            and q.stride(-1) == 1 and cache.stride(-1) == 1 and available())


def paged_decode(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float, out: torch.Tensor) -> bool:
    """q, out [rows, heads, d]; cache [2, blocks, kv_heads, block_size, d]; tables [rows, width]
    and lens [rows] int64 (keys per row). Writes out; False where the shapes do not fit the
    kernel (then out is untouched)."""
    tables, lens = cpu_kernels.int64(tables), cpu_kernels.int64(lens)
    args = _Args(q.data_ptr(), cache[0].data_ptr(), cache[1].data_ptr(), out.data_ptr(),
                 tables.data_ptr(), lens.data_ptr(), q.stride(0), q.stride(1), out.stride(0),
                 out.stride(1), cache.stride(1), cache.stride(2), cache.stride(3), tables.stride(0),
                 q.shape[0], q.shape[1], cache.shape[2], q.shape[2], cache.shape[3],
                 DTYPES[q.dtype], torch.get_num_threads(), scale)
    return _kernel()(ctypes.byref(args)) == 0


@functools.cache
def _kernel():
    return cpu_kernels.function("paged_decode", _Args)
