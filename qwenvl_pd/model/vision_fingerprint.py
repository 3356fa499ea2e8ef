"""The identity of a loaded vision tower's weights: equal digests, equal embeddings for equal
pixels. The encode node stamps it on every embedding handle and key; prefill computes it from
its own tower and reads only embeddings made by weights equal to its own."""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from qwenvl_pd.model_config import VisionConfig


def vision_fingerprint(family: str, vision: VisionConfig, tower: nn.Module | dict[str, torch.Tensor],
                       quantization: str = "none") -> str:
    """sha256 hex over the family, the vision config, the tower's quantisation (today always
    "none": only decoder projections run quantised, quant/apply.py refuses the rest) and every
    tensor of the tower (its state_dict, or one given): name, dtype, shape and bytes."""
    state = tower.state_dict() if isinstance(tower, nn.Module) else tower
    digest = hashlib.sha256()
    head = {"family": family, "vision": vision.raw, "quantization": quantization}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"\0{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
