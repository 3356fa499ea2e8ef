"""Tiny random-weight checkpoints in exactly the layout of the released Hugging Face ones.

No weights can be downloaded on the machines this project is tested on; these checkpoints carry
the real Qwen vocabulary, tokenizer, chat template and processor settings, so every loading path
is the one a real checkpoint takes.
"""
import json
import math
from importlib import resources
from pathlib import Path

import torch

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.registry import MODELS
from qwenvl_pd.model.shards import save_shards
from qwenvl_pd.model.tokenizer_files import write_tokenizer

ARCHS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
TOKENS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
              vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
              video_token_id=151656)
_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02,
             attention_dropout=0.0, use_cache=True)


def _qwen2_5_vl() -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **TOKENS, **_TEXT, "vocab_size": 152064, "max_position_embeddings": 32768,
        "max_window_layers": 3, "use_sliding_window": False, "sliding_window": 32768,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "vision_config": {
            "depth": 4, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
            "num_heads": 2, "in_chans": 3, "out_hidden_size": 128, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [1, 3], "tokens_per_second": 2, "temporal_patch_size": 2,
        },
    }


def _qwen3_vl(moe: bool) -> dict:
    text = {**_TEXT, "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 32, "vocab_size": 151936,
            "max_position_embeddings": 262144, "attention_bias": False, "dtype": "float32",
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": not moe}
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    arch = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    return {
        "architectures": [arch], "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": not moe, "text_config": text,
        "vision_config": {
            "model_type": "qwen3_vl", "deepstack_visual_indexes": [1, 2], "depth": 4,
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": 64, "in_channels": 3,
            "initializer_range": 0.02, "intermediate_size": 128, "num_heads": 2,
            "num_position_embeddings": 2304, "out_hidden_size": 128, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }


def _preprocessor(arch: str) -> tuple[dict, dict | None]:
    if arch == "qwen2_5_vl":
        return ({"min_pixels": 3136, "max_pixels": 1003520, "patch_size": 14,
                 "temporal_patch_size": 2, "merge_size": 2,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711],
                 "image_processor_type": "Qwen2VLImageProcessor",
                 "processor_class": "Qwen2_5_VLProcessor"}, None)
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    image = {**common, "size": {"longest_edge": 1048576, "shortest_edge": 65536},
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "size": {"longest_edge": 1048576, "shortest_edge": 4096}, "fps": 2,
             "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
             "video_processor_type": "Qwen3VLVideoProcessor"}
    return image, video


def make_tiny(arch: str, out: str | Path, seed: int = 0, text_overrides: dict | None = None,
              quantize: str = "none", dtype: str = "float32", vision_overrides: dict | None = None) -> Path:
    """Write a tiny checkpoint of `arch` into `out` and return its path. text_overrides changes
    language-model sizes (benchmarks use larger ones); "mrope_section" goes to the rope settings.
    quantize "w8a8" | "w8a8_dynamic": msModelSlim's layout, calibrated on random tokens.
    dtype: the weights' dtype, declared in config.json as releases do (dtype "auto" follows it);
    vision_overrides: vision tower sizes (depth, hidden_size, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _qwen2_5_vl() if arch == "qwen2_5_vl" else _qwen3_vl(arch == "qwen3_vl_moe")
    config["vision_config"].update(vision_overrides or {})
    _override(config, dict(text_overrides or {}))
    text = config.get("text_config", config)
    text["torch_dtype" if "torch_dtype" in text else "dtype"] = dtype
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                 "do_sample": False})
    image, video = _preprocessor(arch)
    _write_json(out / "preprocessor_config.json", image)
    if video:
        _write_json(out / "video_preprocessor_config.json", video)
    _write_tokenizer(out, arch)
    _write_weights(out, ModelConfig.from_hf(out), seed, getattr(torch, dtype))
    if quantize != "none":
        from qwenvl_pd.model.quant.calibrate import quantize_checkpoint
        quantize_checkpoint(out, quantize, seed)
    return out


def _override(config: dict, changes: dict) -> None:
    text = config.get("text_config", config)
    if "mrope_section" in changes:
        text["rope_scaling"]["mrope_section"] = changes.pop("mrope_section")
    text.update(changes)
    config["vision_config"]["out_hidden_size"] = text["hidden_size"]


def _write_tokenizer(out: Path, arch: str) -> None:
    family = "qwen2_5_vl" if arch == "qwen2_5_vl" else "qwen3_vl"
    write_tokenizer(out, family)
    template = resources.files("qwenvl_pd.model").joinpath(f"templates/{family}.jinja").read_text()
    _write_json(out / "chat_template.json", {"chat_template": template})
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    _write_json(out / "tokenizer_config.json", {**tok_cfg, "chat_template": template})


def _write_weights(out: Path, config: ModelConfig, seed: int, dtype: torch.dtype) -> None:
    cls, _ = MODELS[config.family]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in cls(config).named_parameters()}
    if config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # tied checkpoints ship no lm_head
    gen = torch.Generator().manual_seed(seed)
    # drawn in float32 then rounded: a bf16 checkpoint is the float32 one of the same seed, rounded
    save_shards(out, {n: _init(n, s, gen).to(dtype) for n, s in shapes.items()})


def _init(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    # Scales keep activations O(1) through the stack and logits spread over a few units, so
    # greedy decoding has clear winners and float32 reruns agree token for token.
    if len(shape) == 1:
        base = 1.0 if name.endswith("weight") and "norm" in name or "ln_q" in name else 0.0
        return base + 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name or "pos_embed" in name:
        return torch.randn(shape, generator=gen)
    fan_in = shape[1] if "experts" in name else math.prod(shape[1:])
    # o_proj and down_proj larger: with tied embeddings the residual otherwise repeats the input token
    scale = 3.0 if name.endswith(("lm_head.weight", "o_proj.weight", "down_proj.weight", "down_proj")) else 1.0
    return torch.randn(shape, generator=gen) * (scale / math.sqrt(fan_in))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
