"""Checkpoints as transformers' own save_pretrained writes them (transformers 5: MoE experts
transposed, num_local_experts) load and give transformers' greedy tokens, text and image."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.expert_layout import RELEASED, TRANSFORMERS5, which_layout
from qwenvl_pd.model.parity import CASES, chat, greedy

ARCHS = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
WRITTEN_BY_SAVE = {"config.json", "generation_config.json", "model.safetensors.index.json"}


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tiny_dirs, tmp_path_factory):
    """(arch, directory save_pretrained wrote, the transformers model that wrote it)."""
    src, dst = tiny_dirs[request.param], tmp_path_factory.mktemp("saved") / request.param
    ref = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    ref.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer, template, processor settings: as a user's copy has them
        if f.name not in WRITTEN_BY_SAVE and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return request.param, dst, ref


def _tensor_shape(path, suffix):
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(suffix):
                    return tuple(f.get_slice(key).get_shape())
    return None


@pytest.mark.parametrize("case", ["text", "one_image"])
def test_save_pretrained_checkpoint_gives_transformers_tokens(saved, case):
    arch, path, ref = saved
    llm = LLM(model=str(path), max_model_len=1024)
    body, mm = CASES[case]
    request = {"prompt": chat(body), "multi_modal_data": mm}
    prompt = llm.inputs.process(request)
    got = llm.generate([request], GREEDY)[0].outputs[0].token_ids
    assert got == greedy(ref, prompt, 16).tokens
    assert llm.model.expert_layout == (TRANSFORMERS5 if arch == "qwen3_vl_moe" else None)


def test_transformers5_writes_the_layout_the_loader_undoes(saved):
    arch, path, _ = saved
    if arch != "qwen3_vl_moe":
        pytest.skip("dense checkpoints have no fused experts")
    text = json.loads((path / "config.json").read_text())["text_config"]
    assert text["num_local_experts"] == 8 and "num_experts" not in text
    assert _tensor_shape(path, "layers.0.mlp.experts.down_proj") == (8, 128, 48)  # [E, hidden, inter]
    assert _tensor_shape(path, "layers.0.mlp.experts.gate_up_proj") == (8, 96, 128)


def test_expert_layout_from_shapes_or_the_saving_version():
    released = (8, 64, 48)  # down_proj [E, inter, hidden]
    assert which_layout((8, 64, 48), released, 5) == RELEASED
    assert which_layout((8, 48, 64), released, 4) == TRANSFORMERS5
    assert which_layout((8, 64, 64), (8, 64, 64), 5) == TRANSFORMERS5  # hidden == moe_inter
    assert which_layout((8, 64, 64), (8, 64, 64), 4) == RELEASED
    assert which_layout((8, 64, 32), released, 5) is None
