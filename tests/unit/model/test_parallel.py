"""Which slice of each checkpoint tensor a rank holds, read without a process group."""
import pytest
import torch
from safetensors import safe_open

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.loader import checkpoint_files, load_model
from qwenvl_pd.model.parallel import TensorParallel, TPError, check_divisible


def test_even_and_padded_splits():
    assert [TensorParallel(r, 4).split(8) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # a vocabulary of 10 over 4 ranks: shares of 3, the last running 2 rows past the end
    assert [TensorParallel(r, 4).padded_split(10) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


@pytest.mark.parametrize("kv_heads, size, expected", [
    (8, 2, [(0, 4), (4, 4)]),
    (2, 2, [(0, 1), (1, 1)]),
    (1, 2, [(0, 1), (0, 1)]),                      # one head, replicated on both ranks
    (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),      # each head on the two ranks whose queries use it
    (4, 8, [(0, 1), (0, 1), (1, 1), (1, 1), (2, 1), (2, 1), (3, 1), (3, 1)]),  # 235B at TP 8
])
def test_kv_heads_split_or_replicate(kv_heads, size, expected):
    assert [TensorParallel(r, size).kv_heads(kv_heads) for r in range(size)] == expected


def test_sizes_that_do_not_divide_are_named(tiny_dirs):
    text = ModelConfig.from_hf(tiny_dirs["qwen3_vl_moe"]).text  # 4 heads, 2 KV, inter 256, 8 experts of 48
    with pytest.raises(TPError) as e:
        check_divisible(text, TensorParallel(0, 5))
    assert str(e.value) == (
        "num_attention_heads (4) is not divisible by tensor_parallel_size 5; "
        "intermediate_size (256) is not divisible by tensor_parallel_size 5; "
        "num_key_value_heads (2) and tensor_parallel_size 5: neither divides the other; "
        "moe_intermediate_size (48) is not divisible by tensor_parallel_size 5")
    with pytest.raises(TPError, match=r"num_experts \(8\) is not divisible by tensor_parallel_size 16"):
        check_divisible(text, TensorParallel(0, 16, expert_parallel=True))


def _tensor(path, name):
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def test_rank_1_of_2_holds_exactly_its_rows_and_columns(tiny_dirs):
    path = tiny_dirs["qwen2_5_vl"]  # 4 heads of 32, 2 KV heads, inter 256, vocab 152064
    cfg = ModelConfig.from_hf(path)
    model = load_model(path, cfg, torch.float32, tp=TensorParallel(1, 2))
    layer, ckpt = model.model.layers[0], lambda n: _tensor(path, f"model.layers.0.{n}")
    attn, mlp = layer.self_attn, layer.mlp
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert model.visual is None  # rank 0 alone encodes images
    # q/k/v packed into one weight: this rank's 2 query heads, then its KV head's rows
    q, k, v = (ckpt(f"self_attn.{n}_proj.weight") for n in "qkv")
    assert torch.equal(attn.qkv.weight.to_dense(), torch.cat([q[64:128], k[32:64], v[32:64]]))
    assert torch.equal(attn.qkv.bias, torch.cat([ckpt(f"self_attn.{n}_proj.bias")[rows] for n, rows in
                                                 [("q", slice(64, 128)), ("k", slice(32, 64)), ("v", slice(32, 64))]]))
    assert torch.equal(attn.o_proj.packed.weight.to_dense(), ckpt("self_attn.o_proj.weight")[:, 64:128])
    assert torch.equal(mlp.gate_up.weight.to_dense(),
                       torch.cat([ckpt("mlp.gate_proj.weight")[128:], ckpt("mlp.up_proj.weight")[128:]]))
    vocab = _tensor(path, "model.embed_tokens.weight")
    assert torch.equal(model.model.embed_tokens.weight, vocab[76032:])


def test_expert_shards_tp_and_ep(tiny_dirs):
    path = tiny_dirs["qwen3_vl_moe"]  # 8 experts, moe_intermediate 48, hidden 128
    cfg = ModelConfig.from_hf(path)
    name = "model.language_model.layers.0.mlp.experts."
    gate_up, down = _tensor(path, name + "gate_up_proj"), _tensor(path, name + "down_proj")
    tp = load_model(path, cfg, torch.float32, tp=TensorParallel(1, 2)).model.language_model.layers[0].mlp.experts
    # held as [E, out, in] after loading (Experts.pack): the shard, transposed
    assert torch.equal(tp.gate_up_proj.transpose(1, 2),
                       torch.cat([gate_up[..., 24:48], gate_up[..., 72:96]], dim=-1))
    assert torch.equal(tp.down_proj.transpose(1, 2), down[:, 24:48])
    ep = load_model(path, cfg, torch.float32,
                    tp=TensorParallel(1, 2, expert_parallel=True)).model.language_model.layers[0].mlp.experts
    assert (ep.first, ep.stop) == (4, 8)
    assert torch.equal(ep.gate_up_proj.transpose(1, 2), gate_up[4:])
    assert torch.equal(ep.down_proj.transpose(1, 2), down[4:])


def test_a_rank_holds_about_half_of_the_text_weights(tiny_dirs):
    path = tiny_dirs["qwen3_vl"]
    cfg = ModelConfig.from_hf(path)

    def text_bytes(tp):
        lm = load_model(path, cfg, torch.float32, tp=tp)
        packed = [m.packed.weight for m in lm.modules() if getattr(m, "packed", None) is not None]
        groups = [m.self_attn.qkv.weight for m in lm.model.language_model.layers] + \
                 [m.mlp.gate_up.weight for m in lm.model.language_model.layers]
        dense = [p for n, p in lm.named_parameters() if "visual" not in n]
        return sum(t.to_dense().numel() for t in packed + groups) + sum(p.numel() for p in dense)
    assert text_bytes(TensorParallel(0, 2)) == pytest.approx(text_bytes(TensorParallel()) / 2, rel=0.01)


def test_an_odd_vocabulary_pads_the_last_shard_with_zero_rows(tmp_path):
    from qwenvl_pd.model.tiny import make_tiny
    path = make_tiny("qwen2_5_vl", tmp_path / "odd", text_overrides={"vocab_size": 151937})
    cfg = ModelConfig.from_hf(path)
    last = load_model(path, cfg, torch.float32, tp=TensorParallel(1, 2)).model.embed_tokens
    vocab = _tensor(path, "model.embed_tokens.weight")
    assert (last.start, last.stop) == (75969, 151938)
    assert torch.equal(last.weight[:-1], vocab[75969:])
    assert torch.equal(last.weight[-1], torch.zeros(128))
