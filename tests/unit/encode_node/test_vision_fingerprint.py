"""The vision-only loader reads the same tower the full model does, and the fingerprint tells
towers apart by their weights."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl_pd.model.loader import checkpoint_files, load_model
from qwenvl_pd.model.vision_fingerprint import vision_fingerprint
from qwenvl_pd.model.vision_loader import load_vision_tower
from qwenvl_pd.model_config import ModelConfig


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_only_tower_has_the_full_models_fingerprint(tiny_dirs, arch):
    cfg = ModelConfig.from_hf(tiny_dirs[arch])
    tower = load_vision_tower(tiny_dirs[arch], cfg, torch.float32)
    full = load_model(tiny_dirs[arch], cfg, torch.float32).vision_tower()
    assert vision_fingerprint(cfg.family, cfg.vision, tower) == vision_fingerprint(cfg.family, cfg.vision, full)
    patch = cfg.vision.patch_size
    pixels = torch.randn(16, 3 * 2 * patch * patch)
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        assert torch.equal(tower(pixels, grid_thw=grid).pooler_output, full(pixels, grid_thw=grid).pooler_output)


def test_no_text_tensor_is_in_the_vision_tower(tiny_dirs):
    cfg = ModelConfig.from_hf(tiny_dirs["qwen3_vl"])
    names = set(load_vision_tower(tiny_dirs["qwen3_vl"], cfg, torch.float32).state_dict())
    assert names and not any("layers." in n or "embed_tokens" in n or "lm_head" in n for n in names)


def test_a_changed_weight_or_dtype_changes_the_fingerprint(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2_5_vl"]
    cfg = ModelConfig.from_hf(src)
    tower = load_vision_tower(src, cfg, torch.float32)
    base = vision_fingerprint(cfg.family, cfg.vision, tower)
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    name = sorted(state)[0]
    state[name].view(-1)[0] += 1e-6
    assert vision_fingerprint(cfg.family, cfg.vision, state) != base
    assert vision_fingerprint(cfg.family, cfg.vision, tower.to(torch.bfloat16)) != base
    assert vision_fingerprint(cfg.family, cfg.vision, load_vision_tower(src, cfg, torch.float32),
                              quantization="ascend-w8a8:x") != base


def test_the_checkpoints_visual_bytes_decide_it(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2_5_vl"]
    cfg = ModelConfig.from_hf(src)
    base = vision_fingerprint(cfg.family, cfg.vision, load_vision_tower(src, cfg, torch.float32))
    for f in src.iterdir():  # a copy with one text weight changed: same vision fingerprint
        (tmp_path / f.name).write_bytes(f.read_bytes()) if f.is_file() else None
    for file in checkpoint_files(tmp_path):
        tensors = load_file(file)
        text = next((k for k in tensors if k.startswith("model.layers.")), None)
        if text:
            tensors[text] = tensors[text] + 1
            save_file(tensors, file, metadata={"format": "pt"})
    assert vision_fingerprint(cfg.family, cfg.vision, load_vision_tower(tmp_path, cfg, torch.float32)) == base
