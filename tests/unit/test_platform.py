"""dtype "auto": the checkpoint's dtype where the device computes it natively, else float32."""
import pytest
import torch

from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.platform import choose_dtype, cpu_flags

SPR = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})  # Sapphire Rapids
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SKYLAKE = frozenset({"avx2", "avx512f"})


@pytest.mark.parametrize("ckpt, device, flags, want", [
    ("bfloat16", "cpu", ZEN4, "bfloat16"),
    ("bfloat16", "cpu", frozenset({"amx_bf16"}), "bfloat16"),
    ("bfloat16", "cpu", SKYLAKE, "float32"),
    ("bfloat16", "cpu", frozenset(), "float32"),
    ("float16", "cpu", SPR, "float32"),           # no AVX512-FP16 / AMX-FP16
    ("float16", "cpu", frozenset({"avx512_fp16"}), "float16"),
    ("float32", "cpu", SPR, "float32"),
    (None, "cpu", SPR, "float32"),                # no dtype in config.json: float32 weights
    ("torch.bfloat16", "cpu", SPR, "bfloat16"),
    ("bfloat16", "cuda", frozenset(), "bfloat16"),
    ("float16", "npu", frozenset(), "float16"),
    ("float32", "cuda", frozenset(), "float32"),
])
def test_auto_follows_checkpoint_where_native(ckpt, device, flags, want):
    assert choose_dtype("auto", ckpt, device, flags)[0] == want
    assert choose_dtype(None, ckpt, device, flags)[0] == want


def test_reason_names_the_missing_flags():
    assert choose_dtype("auto", "bfloat16", "cpu", SKYLAKE) == (
        "float32", "auto: the checkpoint is bfloat16, but this CPU has none of avx512_bf16, amx_bf16")
    assert choose_dtype("auto", "bfloat16", "cpu", ZEN4) == (
        "bfloat16", "auto: the checkpoint's bfloat16, native on this CPU")


@pytest.mark.parametrize("requested, want", [
    ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("float", "float32"), ("half", "float16"),
    ("float32", "float32")])
def test_explicit_dtype_overrides(requested, want):
    assert choose_dtype(requested, "bfloat16", "cpu", SKYLAKE) == (want, "requested")
    assert choose_dtype(requested, "float32", "cuda", frozenset())[0] == want


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype 'float64': use auto, float32, bfloat16 or float16"):
        choose_dtype("float64", "bfloat16", "cpu", SPR)


def test_cpu_flags_reads_this_machine():
    flags = cpu_flags()
    assert isinstance(flags, frozenset) and all(" " not in f for f in flags)


def test_tiny_checkpoint_declares_its_weights_dtype(tmp_path):
    path = make_tiny("qwen3_vl", tmp_path / "bf16", dtype="bfloat16")
    assert ModelConfig.from_hf(path).torch_dtype == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(path / "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
