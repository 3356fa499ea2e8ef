"""C kernels for CPU attention, bf16 linears and sampling (csrc/), built on first use for this
very CPU.

Each source is compiled with the system C compiler (-march=native) into
~/.cache/qwenvl-pd/kernels, keyed by source, compiler and CPU, so later starts load it at once.
Without a compiler (or with QWENVL_PD_CPU_KERNEL=0) each caller keeps its torch path.
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
SOURCES = Path(__file__).with_name("csrc")
# reassociation lets the compiler vectorise the sums (results stay within float rounding)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-shared", "-fPIC"]


def enabled() -> bool:
    """Read each call, so a benchmark can compare both paths in one process."""
    return os.environ.get("QWENVL_PD_CPU_KERNEL", "1") != "0"


def function(name: str, args: type[ctypes.Structure]):
    """The C function `name` of csrc/<name>.c, taking a pointer to `args` and returning int;
    None where it cannot be built or loaded."""
    lib = _library(name)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [ctypes.POINTER(args)], ctypes.c_int
    return fn


def int64(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as the kernels read it: int64, last axis contiguous."""
    t = t.to(torch.int64)
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(_build(SOURCES / f"{name}.c")))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernel %s unavailable (%s): using the torch path", name, e)
        return None


def _build(source: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *FLAGS]).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    target = Path(os.environ.get("QWENVL_PD_CACHE", Path.home() / ".cache/qwenvl-pd")) / "kernels"
    path = target / f"{source.stem}-{key}.so"
    if not path.exists():
        target.mkdir(parents=True, exist_ok=True)
        # built aside and renamed: ranks and nodes starting together never load half a file
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            built = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, "-o", str(built), str(source), "-lm"],
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
