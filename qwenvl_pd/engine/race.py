"""Sampling's exponential race with counter-based noise: token i of a row wins with probability
p_i / sum(p), its uniform a hash of (the row's key, i). csrc/race.c runs it in one pass on CPU;
the torch version here is the same arithmetic for other devices and CPUs without the kernel."""
import ctypes
import functools

import torch

from qwenvl_pd.model.layers import cpu_kernels

_MIX = (0x7feb352d, 0x846ca68b)
_GOLDEN = 0x9e3779b1
_LOW = 0xffffffff


class _Args(ctypes.Structure):
    _fields_ = [("probs", ctypes.c_void_p), ("keys", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("row_stride", ctypes.c_int64),
                *[(n, ctypes.c_int) for n in ("rows", "vocab", "threads")]]


def race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """probs [B, vocab] >= 0 (float32), keys [B] int64 -> [B] token ids."""
    if probs.device.type == "cpu" and probs.dtype == torch.float32 and probs.stride(-1) == 1 \
            and cpu_kernels.enabled() and _kernel() is not None:
        keys, out = keys.contiguous(), torch.empty(len(keys), dtype=torch.int64)
        args = _Args(probs.data_ptr(), keys.data_ptr(), out.data_ptr(), probs.stride(0),
                     probs.shape[0], probs.shape[1], torch.get_num_threads())
        _kernel()(ctypes.byref(args))
        return out
    return race_torch(probs, keys)


def race_torch(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    ids = torch.arange(probs.shape[1], dtype=torch.int64, device=probs.device)
    keys = keys.to(probs.device)[:, None]
    h = _mix((ids * _GOLDEN & _LOW) ^ (keys & _LOW))
    h = _mix(h ^ ((keys >> 32) & _LOW))  # [B, vocab], 32-bit values in int64
    q = _neg_log_uniform(h)
    score = torch.where(probs > 0, probs.float() / q, torch.full_like(q, -1.0))
    return score.argmax(-1)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """csrc/race.c's mix(), products kept to their low 32 bits."""
    h = h ^ (h >> 16)
    h = h * _MIX[0] & _LOW
    h = h ^ (h >> 15)
    h = h * _MIX[1] & _LOW
    return h ^ (h >> 16)


def _neg_log_uniform(h: torch.Tensor) -> torch.Tensor:
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    m, e = torch.frexp(u)  # u = m * 2^e, m in [0.5, 1): as [1, 2) with e - 1
    m, e = m * 2, (e - 1).float()
    t = (m - 1) / (m + 1)
    t2 = t * t
    s = 1 + t2 * (1 / 3 + t2 * (1 / 5 + t2 * (1 / 7 + t2 * (1 / 9))))
    return -(e * 0.69314718056 + 2 * t * s)


@functools.cache
def _kernel():
    return cpu_kernels.function("race", _Args)
