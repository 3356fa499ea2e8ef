"""The vision tower alone, for the encode role: only the checkpoint's visual tensors are read
(the text weights are never loaded), under the same names the full model loads them by."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qwenvl_pd.model.loader import checkpoint_files
from qwenvl_pd.model.registry import MODELS
from qwenvl_pd.model.vision import build_vision_tower
from qwenvl_pd.model.weight_error import WeightError
from qwenvl_pd.model_config import ModelConfig


def load_vision_tower(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> nn.Module:
    """The family's tower with its checkpoint weights, in dtype on device, in eval mode."""
    _, renames = MODELS[config.family]
    with torch.device(device):
        tower = build_vision_tower(config.family, config.vision).to(dtype)
    params = dict(tower.named_parameters())
    seen = _load(tower, params, Path(model_dir), renames)
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(f"{n} {tuple(params[n].shape)}" for n in missing[:8])
        raise WeightError(f"{model_dir}: {len(missing)} vision tensors missing from the checkpoint: {shown}")
    return tower.eval().requires_grad_(False)


def _load(tower: nn.Module, params: dict, model_dir: Path, renames) -> set[str]:
    # the full model's name for a visual tensor, e.g. "model.visual." for Qwen3-VL
    prefix = _model_name("visual.", renames)
    seen = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _model_name(key, renames)
                local = name[len(prefix):] if name.startswith(prefix) else None
                if local in params:  # only these tensors are ever read from disk
                    _copy(params[local], f.get_tensor(key), name, file)
                    seen.add(local)
    return seen


def _model_name(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise WeightError(f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                          f"the config needs {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
