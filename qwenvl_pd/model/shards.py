"""Writing weights as sharded releases ship them: safetensors shards and their index."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_shards(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two safetensors shards and their index, as sharded releases ship."""
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(out / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
