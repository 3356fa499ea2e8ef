"""The Qwen2/Qwen3 decoder shared by every family: HF parameter names, paged KV, flat token batch."""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qwenvl_pd.model_config import TextConfig
from qwenvl_pd.model.layers.attention import AttentionMetadata, paged_attention, write_kv
from qwenvl_pd.model.layers.embedding import VocabEmbedding
from qwenvl_pd.model.layers.linear import LinearGroup, RowLinear, column_linear, pack_group
from qwenvl_pd.model.layers.mlp import GatedMLP
from qwenvl_pd.model.layers.moe import SparseMoE
from qwenvl_pd.model.layers.norm import RMSNorm
from qwenvl_pd.model.layers.rotary import MRotaryEmbedding, apply_rotary
from qwenvl_pd.model.parallel import TensorParallel


@dataclass
class VisualInjection:
    """Vision embeddings to place at the multimodal placeholder positions of one forward."""
    mask: torch.Tensor                    # [T] bool, True at image/video pad tokens
    embeds: torch.Tensor                  # [mask.sum(), hidden]
    deepstack: torch.Tensor | None = None  # [num_deepstack, mask.sum(), hidden], Qwen3-VL only


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        first_kv, self.num_kv_heads = tp.kv_heads(cfg.num_kv_heads)
        q_rows = tuple(i * d for i in tp.split(cfg.num_heads))
        kv_rows = (first_kv * d, (first_kv + self.num_kv_heads) * d)
        self.num_heads, self.head_dim = (q_rows[1] - q_rows[0]) // d, d
        self.q_proj = column_linear(h, cfg.num_heads * d, cfg.attention_bias, q_rows)
        self.k_proj = column_linear(h, cfg.num_kv_heads * d, cfg.attention_bias, kv_rows)
        self.v_proj = column_linear(h, cfg.num_kv_heads * d, cfg.attention_bias, kv_rows)
        self.o_proj = RowLinear(cfg.num_heads * d, h, tp)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.qkv = LinearGroup(self.q_proj, self.k_proj, self.v_proj)  # packed by pack()

    def pack(self) -> None:
        # regrouped from the attributes: quantisation may have swapped the linears since
        self.qkv = pack_group(LinearGroup(self.q_proj, self.k_proj, self.v_proj))
        self.o_proj.pack()

    def forward(self, x, rope, cache, meta: AttentionMetadata):
        q, k, v = self.qkv(x)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, heads, d]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        write_kv(cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, cache, meta, self.head_dim ** -0.5)
        return self.o_proj(out.flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(cfg, tp)
        if cfg.is_moe_layer(index):
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size,
                                 cfg.num_experts, cfg.num_experts_per_tok, tp)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                       cfg.mrope_interleaved)
        # after each layer of an eager forward, when set: engine/kv_streams.py streams the KV
        self.on_layer: Callable[[int], None] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, visual: VisualInjection | None = None) -> torch.Tensor:
        """input_ids [T], positions [3, T], kv_cache [layers, 2, blocks, kv_heads, block_size, d]
        -> hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        if visual is not None:
            x = x.masked_scatter(visual.mask[:, None], visual.embeds.to(x.dtype))
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv_cache[i], meta)
            if self.on_layer is not None:
                self.on_layer(i)
            if visual is not None and visual.deepstack is not None and i < visual.deepstack.shape[0]:
                # DeepStack: early layers get the vision tower's intermediate features added back
                x = x.index_put((visual.mask,), visual.deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x)
