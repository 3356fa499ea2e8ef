"""Vision towers: transformers' own module classes behind one small interface.

Parity with the reference is the point of reusing them; several images or videos go through
one forward (the towers attend within each item via cu_seqlens).
"""
import functools
from dataclasses import dataclass

import torch
from torch import nn

from qwenvl_pd.model.layers import cpu_prefill
from qwenvl_pd.model_config import VisionConfig

ATTENTION = "qwenvl_pd_sdpa"


@dataclass
class VisionEmbeds:
    embeds: torch.Tensor                   # [num_tokens, hidden] after the patch merger
    deepstack: torch.Tensor | None = None  # [num_deepstack, num_tokens, hidden]

    def split(self, sizes: list[int]) -> list["VisionEmbeds"]:
        """One VisionEmbeds per image, in the order they were encoded."""
        embeds = self.embeds.split(sizes)
        if self.deepstack is None:
            return [VisionEmbeds(e) for e in embeds]
        return [VisionEmbeds(e, d) for e, d in zip(embeds, self.deepstack.split(sizes, dim=1))]


def build_vision_tower(family: str, cfg: VisionConfig) -> nn.Module:
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import \
            Qwen2_5_VisionTransformerPretrainedModel as Tower
        hf_cfg = Qwen2_5_VLConfig(vision_config=cfg.raw).vision_config
    else:
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Tower
        hf_cfg = Qwen3VLConfig(vision_config=cfg.raw).vision_config
    _register_attention()
    hf_cfg._attn_implementation = ATTENTION
    return Tower(hf_cfg)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' SDPA for the towers, but bf16 on CPU runs cpu_prefill's kernel (twice
    torch's rate there): query, key, value [1, heads, n, d] -> ([1, n, heads, d], None)."""
    if (attention_mask is None and not is_causal and not dropout and query.shape[0] == 1
            and cpu_prefill.supports(query)):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = cpu_prefill.dense(query[0], key[0], value[0], scale)
        if out is not None:
            return out[None], None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


@functools.cache
def _register_attention() -> None:
    """On the first tower built, not at import: transformers' attention registry pulls in its
    model-loading modules (~1 s a start), which a decode node, holding no tower, never needs."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, _attention)


def encode(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionEmbeds:
    """pixel_values [num_patches, C*T*P*P], grid_thw [n, 3] -> merged embeddings of all n items."""
    out = tower(pixel_values.to(tower.dtype), grid_thw=grid_thw)
    deepstack = getattr(out, "deepstack_features", None)
    return VisionEmbeds(out.pooler_output, torch.stack(deepstack) if deepstack else None)
