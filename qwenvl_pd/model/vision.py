"""Vision towers: transformers' own module classes behind one small interface.

Parity with the reference is the point of reusing them; several images or videos go through
one forward (the towers attend within each item via cu_seqlens).
"""
from dataclasses import dataclass

import torch
from torch import nn

from qwenvl_pd.model_config import VisionConfig


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
    hf_cfg._attn_implementation = "sdpa"
    return Tower(hf_cfg)


def encode(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionEmbeds:
    """pixel_values [num_patches, C*T*P*P], grid_thw [n, 3] -> merged embeddings of all n items."""
    out = tower(pixel_values.to(tower.dtype), grid_thw=grid_thw)
    deepstack = getattr(out, "deepstack_features", None)
    return VisionEmbeds(out.pooler_output, torch.stack(deepstack) if deepstack else None)
