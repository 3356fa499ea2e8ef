"""A sample's prompt logprobs as prefill sent them -> what the responses carry: vLLM's
prompt_logprobs list, and for completions' echo with logprobs the prompt's own entries, which go
before the completion's (the legacy API's shape that lm-eval's loglikelihood reads)."""
from __future__ import annotations

from collections.abc import Sequence

from qwenvl_pd.messages import PromptLogprobs
from qwenvl_pd.proxy.prompt.detokenizer import TokenTable
from qwenvl_pd.proxy.errors import server_error
from qwenvl_pd.proxy.responses import PromptLogprobList, RankedLogprob, TokenLogprob, TopLogprob


def ranked(prompt_ids: Sequence[int], lp: PromptLogprobs, tokens: TokenTable) -> PromptLogprobList:
    """None for the first token, then per token its own entry and the top ones not equal to it."""
    if len(lp) != len(prompt_ids) - 1:
        raise server_error(f"prefill sent prompt logprobs for {len(lp)} positions of a "
                           f"{len(prompt_ids)}-token prompt")
    out: list[tuple[RankedLogprob, ...] | None] = [None]
    for i, token in enumerate(prompt_ids[1:]):
        own = RankedLogprob(token, lp.logprobs[i], lp.ranks[i], tokens.text(token))
        out.append((own, *(RankedLogprob(t, v, j + 1, tokens.text(t))
                           for j, (t, v) in enumerate(lp.top(i)) if t != token)))
    return tuple(out)


def echo_entries(prompt_ids: Sequence[int], entries: PromptLogprobList, k: int,
                 tokens: TokenTable) -> tuple[TokenLogprob, ...]:
    """The prompt's tokens as completion logprob entries: the first scored by nothing (nulls),
    each other with its own logprob and at most k + 1 alternatives, its own first (vLLM's cut)."""
    first = TokenLogprob(tokens.text(prompt_ids[0]), None, tuple(tokens.bytes(prompt_ids[0])), None)
    rest = [TokenLogprob(p[0].decoded_token, p[0].logprob, tuple(tokens.bytes(p[0].token_id)),
                         tuple(TopLogprob(e.decoded_token, e.logprob, tuple(tokens.bytes(e.token_id)))
                               for e in p[:k + 1]))
            for p in entries[1:]]
    return (first, *rest)
