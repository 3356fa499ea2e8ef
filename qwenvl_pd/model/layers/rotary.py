"""Multimodal RoPE: three position rows (time, height, width) share one head dimension."""
import torch
from torch import nn


class MRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, section: tuple[int, ...], interleaved: bool):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.section = list(section)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, sin [T, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, head_dim/2]
        freqs = self._interleave(freqs) if self.interleaved else self._chunked(freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _chunked(self, freqs: torch.Tensor) -> torch.Tensor:
        # Qwen2.5-VL: contiguous chunks of the frequency axis follow t, h, w in turn
        chunks = freqs.split(self.section, dim=-1)
        return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)

    def _interleave(self, freqs: torch.Tensor) -> torch.Tensor:
        # Qwen3-VL: frequencies cycle t, h, w; h and w take every third slot up to their share
        out = freqs[0].clone()
        for row, offset in ((1, 1), (2, 2)):
            idx = slice(offset, self.section[row] * 3, 3)
            out[..., idx] = freqs[row, ..., idx]
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
