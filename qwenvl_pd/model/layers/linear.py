"""nn.Linear with a faster CPU path for the few-token (decode) batches."""
import torch
import torch.nn.functional as F
from torch import nn

# Measured with MKL on 2 cores: for up to this many tokens W @ x^T beats x @ W^T (up to 2x);
# above it the two meet and F.linear is kept.
SMALL_BATCH = 256
# A W taller than TALL (the lm_head: 152k rows) goes ~30% faster at 16-32 tokens in row panels.
TALL, ROW_PANEL = 16384, 2048


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] -> [T, out], like F.linear."""
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] > SMALL_BATCH:
        return F.linear(x, weight, bias)
    if weight.shape[0] <= TALL:
        out = weight @ x.T if bias is None else torch.addmm(bias[:, None], weight, x.T)  # [out, T]
    else:
        out = torch.empty(weight.shape[0], x.shape[0], dtype=x.dtype)
        for row in range(0, weight.shape[0], ROW_PANEL):
            torch.mm(weight[row:row + ROW_PANEL], x.T, out=out[row:row + ROW_PANEL])
        if bias is not None:
            out += bias[:, None]
    return out.T.contiguous()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
