"""Weight loading by Hugging Face names from (sharded) safetensors."""
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.expert_layout import TRANSFORMERS5, saved_major, which_layout
from qwenvl_pd.model.parallel import Shard, TensorParallel, check_divisible
from qwenvl_pd.model.quant.apply import check_quantised, quantise_modules
from qwenvl_pd.model.quant.description import read_description, resolve_method
from qwenvl_pd.model.registry import MODELS
from qwenvl_pd.model.weight_error import WeightError

log = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise WeightError(f"{model_dir}: safetensors files missing: {missing or '*.safetensors'}")
    return files


def load_model(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
               device: torch.device | str = "cpu", tp: TensorParallel = TensorParallel(),
               quantization: str | None = None, vision: bool = True) -> VisionLanguageModel:
    """The model with this rank's shard of every weight (all of them at tensor_parallel 1).
    quantization: "ascend" (msModelSlim W8A8), "none", or None to detect it. vision=False: no
    vision tower (a decode node never encodes), its weights left unread."""
    check_divisible(config.text, tp)
    cls, renames = MODELS[config.family]
    desc = read_description(model_dir, resolve_method(model_dir, quantization), renames)
    with torch.device(device):
        model = cls(config, tp, vision).to(dtype)
    if desc is not None:
        quantise_modules(model, desc, tp)
    load_weights(model, Path(model_dir), renames)
    check_quantised(model)
    model.quantization = desc.label if desc else "none"
    model.pack_weights()
    # serving never trains: without this, a forward outside inference mode (the vision tower's)
    # records its graph, and a cached embedding then holds every activation of its tower pass
    return model.eval().requires_grad_(False)


def load_weights(model: VisionLanguageModel, model_dir: Path, renames) -> None:
    params = dict(model.named_parameters())
    seen: set[str] = set()
    layouts: set[str] = set()
    major = saved_major(model_dir)
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _rename(key, renames)
                if name not in params:
                    continue  # e.g. rotary caches some exporters write
                tensor, layout = _read(f, key, params[name], name, file, major)
                _copy(params[name], tensor, name, file)
                seen.add(name)
                layouts.add(layout)
    if model.config.text.tie_word_embeddings:
        model.tie_weights()
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(f"{n} {tuple(params[n].shape)}" for n in missing[:8])
        raise WeightError(f"{model_dir}: {len(missing)} tensors missing from the checkpoint: {shown}")
    _report_experts(model, layouts - {None})


def _report_experts(model: VisionLanguageModel, layouts: set[str]) -> None:
    model.expert_layout = ", ".join(sorted(layouts)) or None
    if layouts:
        log.info("MoE experts in the %s layout", model.expert_layout)


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _read(f, key: str, param: torch.Tensor, name: str, file: Path, major: int
          ) -> tuple[torch.Tensor, str | None]:
    """The part of the checkpoint tensor the parameter holds (only those bytes are read), and
    the expert layout it was found in (None for all but fused experts)."""
    spec: Shard | None = getattr(param, "shard", None)
    if spec is None:
        return f.get_tensor(key), None
    tensor = f.get_slice(key)
    shape = tuple(tensor.get_shape())
    full = tuple(spec.full if i == spec.dim else n for i, n in enumerate(param.shape))
    layout = which_layout(shape, full, major) if getattr(param, "fused_experts", False) else None
    if layout == TRANSFORMERS5:  # the transposed tensor's matching slice, turned back
        swapped = Shard({1: 2, 2: 1}.get(spec.dim, spec.dim), spec.pieces, spec.full)
        return _slices(tensor, shape, swapped).transpose(1, 2).contiguous(), layout
    if shape != full:
        raise WeightError(f"{file.name}: tensor {name} has shape {shape}, the config needs {full}")
    return _slices(tensor, shape, spec), layout


def _slices(tensor, shape: tuple[int, ...], spec: Shard) -> torch.Tensor:
    return torch.cat([_piece(tensor, shape, spec.dim, *p) for p in spec.pieces], dim=spec.dim)


def _piece(tensor, shape: tuple[int, ...], dim: int, start: int, stop: int) -> torch.Tensor:
    end = min(stop, shape[dim])
    part = tensor[(slice(None),) * dim + (slice(start, end),)]
    if end == stop:
        return part
    pad = list(shape)
    pad[dim] = stop - max(start, end)  # rows past the checkpoint's vocabulary
    return torch.cat([part, part.new_zeros(pad)], dim=dim)


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    allowed = getattr(param, "dtypes", None)  # quantised tensors: copy_ would cast silently
    if allowed and tensor.dtype not in allowed:
        raise WeightError(f"{file.name}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, "
                          f"its scheme needs {' or '.join(str(d).removeprefix('torch.') for d in allowed)}")
    if getattr(param, "decode", None):
        tensor = param.decode(tensor)
    if tuple(param.shape) != tuple(tensor.shape):
        raise WeightError(f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                          f"the config needs {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
