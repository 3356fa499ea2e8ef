"""Decode attention on CPU that reads the paged KV cache in place (csrc/paged_decode.c).

The torch reference copies every row's whole context out of the cache each layer and step, then
runs SDPA over the copy; this kernel reads K and V once, through the block tables. It is
compiled on first use with the system C compiler for this very CPU (-march=native) into
~/.cache/qwenvl-pd/kernels, keyed by source, compiler and CPU, so later starts load it at once.
Without a compiler (or with QWENVL_PD_CPU_KERNEL=0) attention keeps the torch reference.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
# reassociation lets the compiler vectorise the sums (results stay within float rounding)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-shared", "-fPIC"]
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
    return os.environ.get("QWENVL_PD_CPU_KERNEL", "1") != "0" and _library() is not None


def supports(q: torch.Tensor, cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in DTYPES and cache.dtype == q.dtype
            and q.stride(-1) == 1 and cache.stride(-1) == 1 and available())


def paged_decode(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float, out: torch.Tensor) -> bool:
    """q, out [rows, heads, d]; cache [2, blocks, kv_heads, block_size, d]; tables [rows, width]
    and lens [rows] int64 (keys per row). Writes out; False where the shapes do not fit the
    kernel (then out is untouched)."""
    tables, lens = _int64(tables), _int64(lens)
    args = _Args(q.data_ptr(), cache[0].data_ptr(), cache[1].data_ptr(), out.data_ptr(),
                 tables.data_ptr(), lens.data_ptr(), q.stride(0), q.stride(1), out.stride(0),
                 out.stride(1), cache.stride(1), cache.stride(2), cache.stride(3), tables.stride(0),
                 q.shape[0], q.shape[1], cache.shape[2], q.shape[2], cache.shape[3],
                 DTYPES[q.dtype], torch.get_num_threads(), scale)
    return _library().paged_decode(ctypes.byref(args)) == 0


def _int64(t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.int64)
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU paged-attention kernel unavailable (%s): using the torch reference", e)
        return None
    lib.paged_decode.argtypes = [ctypes.POINTER(_Args)]
    lib.paged_decode.restype = ctypes.c_int
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    target = Path(os.environ.get("QWENVL_PD_CACHE", Path.home() / ".cache/qwenvl-pd")) / "kernels"
    path = target / f"paged_decode-{key}.so"
    if not path.exists():
        target.mkdir(parents=True, exist_ok=True)
        # built aside and renamed: ranks and nodes starting together never load half a file
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            built = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(built, path)
    return path


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(line for line in info.splitlines()[:40]
                         if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor()
