"""load_model without the vision tower, as decode nodes load it."""
import pytest
import torch

from qwenvl_pd.model.loader import load_model
from qwenvl_pd.model_config import ModelConfig


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_without_vision_no_tower_weight_is_held_and_the_text_weights_are_the_same(tiny_dirs, arch):
    cfg = ModelConfig.from_hf(tiny_dirs[arch])
    full = load_model(tiny_dirs[arch], cfg, torch.float32)
    text_only = load_model(tiny_dirs[arch], cfg, torch.float32, vision=False)
    assert text_only.vision_tower() is None and full.vision_tower() is not None
    theirs = {n: p for n, p in full.named_parameters() if ".visual." not in f".{n}"}
    mine = dict(text_only.named_parameters())
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
