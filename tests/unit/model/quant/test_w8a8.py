"""msModelSlim W8A8 checkpoints: int8 weights in memory, the same greedy tokens as a float64
reference of the quantised math, tensor-parallel shards, and clear errors for what is not run."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.kv_transfer.layout import fingerprint_for
from qwenvl_pd.model.loader import WeightError, load_model
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.model.parity import case_request
from qwenvl_pd.model.quant.experts import QuantExperts
from qwenvl_pd.model.quant.linear import W8A8DynamicLinear, W8A8Linear
from qwenvl_pd.model.tiny import make_tiny
from w8a8_reference import checkpoint_tensors, use_reference

QUANTISED = {  # name -> (arch, make-tiny --quantize)
    "qwen2_5_vl_w8a8": ("qwen2_5_vl", "w8a8"),           # static, with q/k/v biases
    "qwen3_vl_moe_w8a8": ("qwen3_vl_moe", "w8a8"),       # static attention, dynamic experts
    "qwen3_vl_moe_dynamic": ("qwen3_vl_moe", "w8a8_dynamic"),
}
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="session")
def quant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    return {name: make_tiny(arch, root / name, quantize=q) for name, (arch, q) in QUANTISED.items()}


def _requests():
    return [case_request(c) for c in ("text", "one_image")]


@pytest.mark.parametrize("name", list(QUANTISED))
def test_w8a8_greedy_tokens_match_the_float_reference(quant_dirs, name):
    path = quant_dirs[name]
    ours = LLM(model=str(path), max_model_len=1024)
    got = [o.outputs[0].token_ids for o in ours.generate(_requests(), GREEDY)]
    ref = LLM(model=str(path), max_model_len=1024)
    assert use_reference(ref.model, path) > 0
    want = [o.outputs[0].token_ids for o in ref.generate(_requests(), GREEDY)]
    assert got == want


def test_int8_weights_stay_int8_in_memory(quant_dirs):
    model = LLM(model=str(quant_dirs["qwen3_vl_moe_w8a8"]), max_model_len=256).model
    layer = model.language_model().layers[0]
    assert isinstance(layer.self_attn.q_proj, W8A8Linear)
    assert layer.self_attn.q_proj.weight.dtype == torch.int8
    assert layer.self_attn.q_proj.weight.shape == (128, 128)
    assert isinstance(layer.mlp.experts, QuantExperts)
    assert isinstance(layer.mlp.experts["7"].down_proj, W8A8DynamicLinear)
    assert layer.mlp.experts["7"].down_proj.weight.dtype == torch.int8
    assert model.quantization.startswith("ascend-w8a8:")


def _ranks(path, size=2, ep=False):
    cfg = ModelConfig.from_hf(path)
    return [load_model(path, cfg, torch.float32, tp=TensorParallel(r, size, ep)) for r in range(size)]


def test_tp_shards_follow_rows_and_columns(quant_dirs):
    path = quant_dirs["qwen2_5_vl_w8a8"]
    t = checkpoint_tensors(path)
    full, *ranks = _ranks(path, 1) + _ranks(path, 2)
    for r, model in enumerate(ranks):
        attn = model.language_model().layers[0].self_attn
        q = "model.layers.0.self_attn.q_proj"
        rows = slice(64 * r, 64 * (r + 1))
        assert torch.equal(attn.q_proj.weight, t[f"{q}.weight"][rows])
        assert torch.equal(attn.q_proj.deq_scale, t[f"{q}.deq_scale"][rows])
        assert torch.equal(attn.q_proj.quant_bias, t[f"{q}.quant_bias"][rows])
        assert torch.equal(attn.q_proj.input_scale, t[f"{q}.input_scale"])  # per tensor: replicated
        o = "model.layers.0.self_attn.o_proj"
        assert torch.equal(attn.o_proj.weight, t[f"{o}.weight"][:, rows])
        assert torch.equal(attn.o_proj.deq_scale, t[f"{o}.deq_scale"])
        assert attn.o_proj.adds_bias == (r == 0)  # the all-reduce must see quant_bias once
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    o_full = full.language_model().layers[0].self_attn.o_proj
    parts = [m.language_model().layers[0].self_attn.o_proj.matmul(x[:, 64 * r:64 * (r + 1)])
             for r, m in enumerate(ranks)]
    # input quantisation is elementwise with one scale, so the split int32 sums add up exactly
    assert torch.allclose(parts[0] + parts[1], o_full.matmul(x), rtol=1e-6, atol=1e-6)


def test_quantised_experts_shard_by_expert_or_by_intermediate(quant_dirs):
    path = quant_dirs["qwen3_vl_moe_dynamic"]
    t = checkpoint_tensors(path)
    e = "model.language_model.layers.0.mlp.experts"
    tp_ranks, ep_ranks = _ranks(path, 2), _ranks(path, 2, ep=True)
    for r in range(2):
        split = tp_ranks[r].language_model().layers[0].mlp.experts
        assert sorted(split, key=int) == [str(i) for i in range(8)]
        assert torch.equal(split["3"].gate_proj.weight, t[f"{e}.3.gate_proj.weight"][24 * r:24 * (r + 1)])
        assert torch.equal(split["3"].down_proj.weight, t[f"{e}.3.down_proj.weight"][:, 24 * r:24 * (r + 1)])
        whole = ep_ranks[r].language_model().layers[0].mlp.experts
        assert sorted(whole, key=int) == [str(i) for i in range(4 * r, 4 * r + 4)]
        assert torch.equal(whole[str(4 * r)].up_proj.weight, t[f"{e}.{4 * r}.up_proj.weight"])


def test_fingerprint_carries_the_quantisation():
    quant = fingerprint_for("qwen2_5_vl:abc", "float32", 16, 3, 2, 32, quantization="ascend-w8a8:1234")
    plain = fingerprint_for("qwen2_5_vl:abc", "float32", 16, 3, 2, 32)
    assert quant.mismatch(plain) == "quantization: prefill ascend-w8a8:1234, decode none"


@pytest.fixture
def ckpt(quant_dirs, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(quant_dirs["qwen2_5_vl_w8a8"], dst)
    return dst


def _edit_description(path, **changes):
    f = path / "quant_model_description.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _load(path, quantization=None):
    return load_model(path, ModelConfig.from_hf(path), torch.float32, quantization=quantization)


def test_unknown_scheme_names_the_tensor(ckpt):
    _edit_description(ckpt, **{"model.layers.1.mlp.up_proj.weight": "W4A8_DYNAMIC"})
    with pytest.raises(WeightError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight: scheme "
                                          r"'W4A8_DYNAMIC' is not one this project runs"):
        _load(ckpt)


def test_float_tensor_where_the_scheme_needs_int8(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = "model.layers.2.self_attn.k_proj.weight"
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key].float()
    save_file(tensors, str(shard))
    with pytest.raises(WeightError, match=rf"tensor {key} is float32, its scheme needs int8"):
        _load(ckpt)


def test_quantised_vision_tensor_is_refused(ckpt):
    _edit_description(ckpt, **{"visual.blocks.0.mlp.gate_proj.weight": "W8A8"})
    with pytest.raises(WeightError, match=r"tensor visual\.blocks\.0\.mlp\.gate_proj\.weight is W8A8: "
                                          r"only the decoder's projections"):
        _load(ckpt)


def test_quantization_flag_against_the_checkpoint(ckpt, tiny_dirs):
    with pytest.raises(WeightError, match="int8 weights cannot load as float; use --quantization ascend"):
        _load(ckpt, "none")
    with pytest.raises(WeightError, match="--quantization ascend needs quant_model_description.json"):
        _load(tiny_dirs["qwen2_5_vl"], "ascend")
