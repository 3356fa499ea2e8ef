"""Weight loading by Hugging Face names from (sharded) safetensors."""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.registry import MODELS


class WeightError(ValueError):
    """The checkpoint's tensors do not fit the model its config.json describes."""


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
               device: torch.device | str = "cpu") -> VisionLanguageModel:
    cls, renames = MODELS[config.family]
    with torch.device(device):
        model = cls(config).to(dtype)
    load_weights(model, Path(model_dir), renames)
    model.pack_weights()
    return model.eval()


def load_weights(model: VisionLanguageModel, model_dir: Path, renames) -> None:
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _rename(key, renames)
                if name not in params:
                    continue  # e.g. rotary caches some exporters write
                _copy(params[name], f.get_tensor(key), name, file)
                seen.add(name)
    if model.config.text.tie_word_embeddings:
        model.tie_weights()
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(f"{n} {tuple(params[n].shape)}" for n in missing[:8])
        raise WeightError(f"{model_dir}: {len(missing)} tensors missing from the checkpoint: {shown}")


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise WeightError(f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                          f"the config needs {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
