"""Bad checkpoints and bad prompts get one clear error that names the problem."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model_config import ConfigError, ModelConfig
from qwenvl_pd.model.inputs import InputError
from qwenvl_pd.model.loader import WeightError, load_model

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture
def ckpt(tiny_dirs, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["qwen2_5_vl"], dst)
    return dst


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return LLM(model=str(tiny_dirs["qwen2_5_vl"]), max_model_len=256,
               limit_mm_per_prompt={"image": 2})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_the_model_type(ckpt):
    _edit_config(ckpt, model_type="llava")
    with pytest.raises(ConfigError, match="unsupported model_type 'llava'"):
        ModelConfig.from_hf(ckpt)


def test_missing_tensor_is_named_with_its_shape(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(WeightError, match=r"model\.norm\.weight \(128,\)"):
        load_model(ckpt, ModelConfig.from_hf(ckpt), torch.float32)


def test_misshaped_tensor_names_both_shapes(ckpt):
    _edit_config(ckpt, intermediate_size=200)
    with pytest.raises(WeightError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), the config needs"):
        load_model(ckpt, ModelConfig.from_hf(ckpt), torch.float32)


def test_missing_shard_file_is_named(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors"):
        load_model(ckpt, ModelConfig.from_hf(ckpt), torch.float32)


def test_more_images_than_the_limit(llm):
    img = Image.new("RGB", (56, 56))
    with pytest.raises(InputError, match="3 images given; limit_mm_per_prompt allows 2"):
        llm.generate({"prompt": IMG * 3, "multi_modal_data": {"image": [img] * 3}})


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(InputError, match="max_model_len is 256"):
        llm.generate({"prompt_token_ids": [9707] * 300})


def test_prompt_plus_max_tokens_over_max_model_len(llm):
    with pytest.raises(ValueError, match=r"exceeds max_model_len \(256\)"):
        llm.generate({"prompt_token_ids": [9707] * 200}, SamplingParams(max_tokens=100))


@pytest.mark.parametrize("pads,n_images", [(2, 1), (1, 0), (0, 1)])
def test_placeholders_that_do_not_match_the_images(llm, pads, n_images):
    mm = {"image": [Image.new("RGB", (56, 56))] * n_images}
    with pytest.raises(InputError, match=f"prompt has {pads} image placeholder.*but {n_images} image"):
        llm.generate({"prompt": IMG * pads + "hi", "multi_modal_data": mm})


def test_bytes_that_are_not_an_image(llm):
    with pytest.raises(InputError, match="(?i)image"):
        llm.generate({"prompt": IMG, "multi_modal_data": {"image": [b"not an image at all"]}})


def test_cli_reports_a_bad_checkpoint_without_a_traceback(ckpt):
    _edit_config(ckpt, model_type="llava")
    proc = subprocess.run([sys.executable, "-m", "qwenvl_pd.cli", "generate", "--model", str(ckpt),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "unsupported model_type 'llava'" in proc.stderr
    assert "Traceback" not in proc.stderr
