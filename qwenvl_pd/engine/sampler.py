"""Token sampling with vLLM's semantics, one pass per step over the whole batch: every stage is
a tensor op over the batch, never a Python loop over the vocabulary.

Order (vLLM's): grammar bitmask -> raw logprobs -> min_tokens mask, logit_bias -> penalties -> greedy argmax, or temperature ->
top_k -> top_p -> min_p -> exponential race. A seeded row's noise is a function of
(seed, position) alone, so its tokens never depend on what else is in the batch. The grammar
bitmask comes first, as vLLM applies it to the logits before its sampler: logprobs are those of
the masked distribution (disallowed tokens -inf, the allowed ones renormalised)."""
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qwenvl_pd.engine.race import race
from qwenvl_pd.sampling_params import SamplingParams

_MASK = float("-inf")
_BITS = (1 << torch.arange(8)).to(torch.uint8)  # bit j of a mask byte
_PREFIX = 1024  # top_p first looks only at this many best tokens; see top_k_top_p_mask


@dataclass
class SamplerInput:
    params: SamplingParams
    position: int  # index the sampled token will take in the sequence (prompt + outputs)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: tuple[int, ...] = ()  # the model's eos ids (ignored when params.ignore_eos)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token, when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # best first


def sample(logits: torch.Tensor, inputs: list[SamplerInput],
           generator: torch.Generator | None = None,
           bitmask: torch.Tensor | None = None) -> list[SampleResult]:
    """logits [B, vocab], row i for inputs[i]; `generator` feeds the unseeded rows; bitmask
    [B, ceil(vocab / 32)] int32 (bit t of row i set: token t allowed) constrains rows to a grammar."""
    raw = logits.float() if bitmask is None else apply_bitmask(logits, bitmask)
    x = raw
    if any(_penalised(i.params) or _below_min_tokens(i) or i.params.logit_bias for i in inputs):
        # raw stays untouched for logprobs; apply_penalties views the copy flat
        x = raw.clone(memory_format=torch.contiguous_format)
        x = apply_penalties(apply_logit_bias(mask_min_tokens(x, inputs), inputs), inputs)
    rows = [i for i, inp in enumerate(inputs) if not inp.params.greedy]
    if not rows:
        return _results(raw, x.argmax(-1), inputs)
    sub = [inputs[i] for i in rows]
    drawn = _draw(filtered_probs(_take(x, rows), [s.params for s in sub]), sub, generator)
    if len(rows) == len(inputs):  # all sampled: no argmax over the vocabulary
        return _results(raw, drawn, inputs)
    token_ids = x.argmax(-1)  # the greedy rows' answer; the sampled rows take their draws
    token_ids[rows] = drawn
    return _results(raw, token_ids, inputs)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A float copy of logits with every token whose bit is clear at -inf, and in those rows the
    ids past the mask's width too. A row with every bit set (no grammar) is left as it is, and
    only rows with a clear bit pay for the unpacking."""
    out = logits.float().clone()
    rows = torch.nonzero((bitmask != -1).any(-1)).flatten()
    if len(rows):
        # byte-wise (little-endian words: byte k holds tokens 8k..8k+7): ~2.5x faster on CPU
        # than shifting the int32 words
        octets = bitmask[rows].contiguous().view(torch.uint8).to(out.device)
        allowed = (octets.unsqueeze(-1) & _BITS.to(out.device)).flatten(1).bool()
        vocab = min(out.shape[1], allowed.shape[1])
        blocked = torch.ones(len(rows), out.shape[1], dtype=torch.bool, device=out.device)
        blocked[:, :vocab] = ~allowed[:, :vocab]
        index = rows.to(out.device)
        out[index] = out[index].masked_fill(blocked, _MASK)
    return out


def mask_min_tokens(logits: torch.Tensor, inputs: list[SamplerInput]) -> torch.Tensor:
    """In place: until a row has min_tokens outputs, every token that would stop it gets -inf."""
    rows, cols = [], []
    for i, inp in enumerate(inputs):
        p = inp.params
        if len(inp.output_token_ids) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(inp.eos_token_ids))
            # an id past the logits can never be sampled, so there is nothing to mask
            ids = [t for t in stops if 0 <= t < logits.shape[1]]
            rows += [i] * len(ids)
            cols += ids
    if rows:
        logits[rows, cols] = _MASK
    return logits


def apply_logit_bias(logits: torch.Tensor, inputs: list[SamplerInput]) -> torch.Tensor:
    """In place: each row's logit_bias added to its tokens' logits (ids past the logits ignored)."""
    rows, cols, bias = [], [], []
    for i, inp in enumerate(inputs):
        for t, b in (inp.params.logit_bias or {}).items():
            if 0 <= t < logits.shape[1]:
                rows.append(i)
                cols.append(t)
                bias.append(b)
    if rows:
        logits[rows, cols] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    return logits


def apply_penalties(logits: torch.Tensor, inputs: list[SamplerInput]) -> torch.Tensor:
    """In place (logits contiguous): repetition over prompt + output tokens (positive logits divided, negative
    multiplied), then presence and frequency over output tokens only. Penalties touch only the
    tokens a row has seen, so the work is on those (row, token) cells, not on [rows, vocab]."""
    rows = [i for i, inp in enumerate(inputs) if _penalised(inp.params)]
    if not rows:
        return logits
    flat, vocab = logits.view(-1), logits.shape[1]
    rep, freq, pres = (_column([getattr(inp.params, name) for inp in inputs], logits).squeeze(1)
                       for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
    out_cells, counts = _cells(rows, [inputs[i].output_token_ids for i in rows], logits).unique(
        return_counts=True)
    if (rep[rows] != 1).any():  # skip the prompts, often long, when no row needs them
        seen = torch.cat([out_cells, _cells(rows, [inputs[i].prompt_token_ids for i in rows],
                                            logits)]).unique()
        value, r = flat[seen], rep[seen // vocab]
        flat[seen] = torch.where(value > 0, value / r, value * r)
    row = out_cells // vocab
    flat[out_cells] -= freq[row] * counts + pres[row]
    return logits


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p -> probabilities, 0 for dropped tokens. Not renormalised
    after min_p: the race below is blind to a row's scale."""
    x = logits / _column([p.temperature for p in params], logits)
    cut = [i for i, p in enumerate(params) if p.top_k != -1 or p.top_p < 1]
    if cut:
        vocab = x.shape[1]
        top_k = torch.tensor([vocab if params[i].top_k == -1 else min(params[i].top_k, vocab)
                              for i in cut])
        top_p = _column([params[i].top_p for i in cut], x).squeeze(1)
        sub = _take(x, cut)
        sub.masked_fill_(top_k_top_p_mask(sub, top_k.to(x.device), top_p), _MASK)
        if sub is not x:  # a copy: write it back
            x[cut] = sub
    probs = x.softmax(-1)
    min_p = _column([p.min_p for p in params], x)
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """True for tokens outside the row's top_k best, or outside the smallest best-first set whose
    probability (renormalised over the top_k) reaches top_p. top_k = vocab / top_p = 1 turn off."""
    vocab = logits.shape[1]
    # Sorting a 152k row costs ~9 ms on CPU, yet the kept set nearly always lies in the first few
    # hundred tokens: look at a prefix, and sort in full only the rows whose set runs past it.
    widest_k = int(torch.where(top_k < vocab, top_k, 0).max())  # top_k off must not widen it
    width = min(vocab, max(_PREFIX, widest_k))
    vals, order = logits.topk(width, -1)
    drop, covered = _sorted_drop(vals, top_k, top_p, logits.logsumexp(-1, keepdim=True))
    # tokens past the prefix stay dropped: a covered row could keep none of them
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, order, drop)
    short = torch.nonzero(~covered).flatten()
    if len(short):
        vals, order = logits[short].sort(-1, descending=True)
        drop, _ = _sorted_drop(vals, top_k[short], top_p[short], None)
        mask[short] = torch.empty_like(drop).scatter_(-1, order, drop)
    return mask


def _sorted_drop(vals, top_k, top_p, row_lse):
    """vals sorted best first (a prefix of each row) -> (drop mask, prefix holds the kept set)."""
    width = vals.shape[1]
    outside_k = torch.arange(width, device=vals.device) >= top_k[:, None]
    vals = vals.masked_fill(outside_k, _MASK)
    # top_p's mass is over the top_k set; when that set is wider than the prefix (top_k off),
    # normalise over the whole row instead
    k_inside = (top_k <= width)[:, None]
    lse = vals.logsumexp(-1, keepdim=True) if row_lse is None else \
        torch.where(k_inside, vals.logsumexp(-1, keepdim=True), row_lse)
    probs = (vals - lse).exp()
    cum = probs.cumsum(-1)
    on = top_p[:, None] < 1  # top_p = 1 keeps all: float cumsums may pass 1 before the end
    drop = outside_k | (on & (cum - probs >= top_p[:, None]))  # keep the token that crosses top_p
    covered = k_inside.squeeze(1) | (cum[:, -1] >= top_p)
    return drop, covered


def _draw(probs: torch.Tensor, inputs: list[SamplerInput], generator) -> torch.Tensor:
    """One token per row, token i with probability probs[i] / sum(probs): an exponential race
    whose noise is a hash of the row's key and the token (engine/race.py), one pass over the
    row. Free rows take their keys from `generator`; a seeded row's key is (seed, position)'s."""
    keys = torch.empty(len(inputs), dtype=torch.int64)
    free = [i for i, inp in enumerate(inputs) if inp.params.seed is None]
    if free:
        keys[free] = torch.randint(0, 1 << 62, (len(free),), generator=generator)
    for i, inp in enumerate(inputs):
        if inp.params.seed is not None:
            keys[i] = _seeded_key(inp.params.seed, inp.position)
    return race(probs, keys)


def _seeded_key(seed: int, position: int) -> int:
    # A hash, not seed * k + position: arithmetic mixes collide along lines of (seed, position)
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _results(raw: torch.Tensor, token_ids: torch.Tensor,
             inputs: list[SamplerInput]) -> list[SampleResult]:
    out = [SampleResult(t) for t in token_ids.tolist()]
    rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs is not None]
    if not rows:
        return out
    logprobs = _take(raw, rows).log_softmax(-1)  # vLLM's raw logprobs: before any penalty or filter
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()
    k = min(max(inputs[i].params.logprobs for i in rows), raw.shape[1])
    top_vals, top_ids = (t.tolist() for t in logprobs.topk(k, -1))
    for j, i in enumerate(rows):
        n = inputs[i].params.logprobs
        out[i].logprob = chosen[j]
        out[i].top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n]))
    return out


def _below_min_tokens(inp: SamplerInput) -> bool:
    # min_tokens is mostly 0: skip counting the outputs then
    return inp.params.min_tokens > 0 and len(inp.output_token_ids) < inp.params.min_tokens


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without the copy when rows is every row (the usual all-sampled batch)."""
    return x if len(rows) == len(x) else x[rows]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _cells(rows: list[int], seqs: list[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """Flat indices row * vocab + token into `like` of every token of seqs[j], in row rows[j]."""
    tokens = torch.cat([torch.tensor(list(s), dtype=torch.long) for s in seqs])
    row_ids = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(s) for s in seqs]))
    return (row_ids * like.shape[1] + tokens).to(like.device)
