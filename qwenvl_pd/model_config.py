"""Frozen configuration, normalised once from a Hugging Face checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

# model_type in config.json -> our family name
FAMILIES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl_moe"}


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be served."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    mrope_interleaved: bool
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    tokens_per_second: float
    num_deepstack: int
    raw: dict = field(hash=False, compare=False, repr=False)  # handed to the vision tower as is


@dataclass(frozen=True)
class ModelConfig:
    family: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    torch_dtype: str

    @staticmethod
    def from_hf(model_dir: str | Path) -> "ModelConfig":
        """Read config.json through transformers' config classes (their aliases and defaults),
        then normalise once."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if model_type not in FAMILIES:
            raise ConfigError(f"{path}: unsupported model_type {model_type!r}; "
                              f"supported: {', '.join(sorted(FAMILIES))}")
        try:
            hf = AutoConfig.from_pretrained(str(model_dir))
            return _build(FAMILIES[model_type], hf, Path(model_dir))
        except ConfigError:
            raise
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None


def _build(family: str, hf, model_dir: Path) -> ModelConfig:
    text = hf.get_text_config()
    return ModelConfig(
        family=family,
        text=_text_config(text, hf),
        vision=_vision_config(hf.vision_config.to_dict(), text),
        image_token_id=_first(hf, "image_token_id", 151655),
        video_token_id=_first(hf, "video_token_id", 151656),
        vision_start_token_id=_first(hf, "vision_start_token_id", 151652),
        vision_end_token_id=_first(hf, "vision_end_token_id", 151653),
        eos_token_ids=_eos_ids(text, model_dir),
        # no dtype in config.json means float32 weights (transformers' and vLLM's reading)
        torch_dtype=str(_first(text, "dtype", None) or _first(hf, "dtype", None) or "float32"
                        ).removeprefix("torch."),
    )


def _first(obj, name: str, default):
    value = getattr(obj, name, None)
    return default if value is None else value


def _text_config(t, top) -> TextConfig:
    rope = dict(getattr(t, "rope_parameters", None) or {})
    head_dim = _first(t, "head_dim", 0) or t.hidden_size // t.num_attention_heads
    section = tuple(rope.get("mrope_section", ()))
    if sum(section) != head_dim // 2:
        raise ConfigError(f"rope mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
    qwen3 = t.model_type.startswith("qwen3")
    return TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=_first(t, "num_key_value_heads", t.num_attention_heads),
        head_dim=head_dim, rms_norm_eps=float(t.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)), mrope_section=section,
        mrope_interleaved=bool(rope.get("mrope_interleaved", qwen3)),
        attention_bias=bool(_first(t, "attention_bias", not qwen3)), qk_norm=qwen3,
        tie_word_embeddings=bool(_first(top, "tie_word_embeddings", False)),
        max_position_embeddings=_first(t, "max_position_embeddings", 32768),
        # transformers 5 saves num_local_experts; the config class maps it back to num_experts
        num_experts=_first(t, "num_experts", 0), num_experts_per_tok=_first(t, "num_experts_per_tok", 0),
        moe_intermediate_size=_first(t, "moe_intermediate_size", 0),
        decoder_sparse_step=_first(t, "decoder_sparse_step", 1),
        mlp_only_layers=tuple(_first(t, "mlp_only_layers", ())),
    )


def _vision_config(v: dict, t) -> VisionConfig:
    return VisionConfig(
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        out_hidden_size=v.get("out_hidden_size", t.hidden_size),
        tokens_per_second=float(v.get("tokens_per_second", 2)),
        num_deepstack=len(v.get("deepstack_visual_indexes", ())),
        raw=v,
    )


def _eos_ids(text, model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.is_file() else []
    sources.append(getattr(text, "eos_token_id", None))
    for src in sources:
        for i in ([src] if isinstance(src, int) else src or []):
            if i not in ids:
                ids.append(i)
    return tuple(ids)
