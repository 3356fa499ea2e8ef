"""Token sampling. A seeded request's noise is a function of (seed, position) alone, so its
output never depends on what else is in the batch."""
import torch

from qwenvl_pd.sampling_params import SamplingParams

_MASK = float("-inf")


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
           generator: torch.Generator | None = None) -> list[int]:
    """logits [B, vocab] float32; positions[i] is the index the sampled token will take."""
    greedy = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy.tolist()
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params])[:, None]
    probs = torch.softmax(_filter(logits / temps, params), dim=-1)
    noise = torch.stack([_exponential(p, pos, logits.shape[1], generator)
                         for p, pos in zip(params, positions)])
    # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race)
    drawn = (probs / noise).argmax(-1)
    return [int(g) if p.greedy else int(d) for p, g, d in zip(params, greedy, drawn)]


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    for i, p in enumerate(params):
        row = logits[i]
        if p.top_k > 0:
            kth = row.topk(min(p.top_k, row.numel())).values[-1]
            row.masked_fill_(row < kth, _MASK)
        if p.top_p < 1.0:
            row.masked_fill_(_top_p_mask(row, p.top_p), _MASK)
        if p.min_p > 0:
            probs = row.softmax(-1)
            row.masked_fill_(probs < p.min_p * probs.max(), _MASK)
    return logits


def _top_p_mask(row: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = row.sort(descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    return torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)


def _exponential(p: SamplingParams, position: int, vocab: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    if p.seed is not None:
        generator = torch.Generator().manual_seed((p.seed * 1_000_003 + position) % (2 ** 63))
    return torch.empty(vocab).exponential_(generator=generator)
