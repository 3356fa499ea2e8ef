"""Grammar matching for structured outputs (llguidance): one tokenizer per node, one matcher per
sequence, and the batch's token bitmask for the sampler.

The model's vocabulary is padded past the tokenizer's: the matcher's tokenizer is built with the
model's size, so ids the tokenizer lacks are never allowed."""
from __future__ import annotations

from collections import OrderedDict
from functools import cached_property

import llguidance as llg
import torch

from qwenvl_pd.grammar import grammar_error, grammar_text
from qwenvl_pd.sampling_params import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept; a matcher for a cached one is a deep copy


class Grammars:
    """Compiles specs into matchers for one tokenizer, caching the compiled grammar by its text."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf, self.vocab_size, self.eos_token_ids = hf_tokenizer, vocab_size, eos_token_ids
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()

    @cached_property
    def tokenizer(self) -> llg.LLTokenizer:
        # ~2 s for Qwen's 152k vocabulary: built on the first grammar, so a node that never
        # sees one does not pay for it at start
        import llguidance.hf  # imported on first use: it loads transformers' tokenizer stack

        return llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                            eos_token=list(self.eos_token_ids))

    def error(self, spec: StructuredOutputsParams) -> str:
        """"" when the spec compiles for this tokenizer, else why not."""
        return grammar_error(spec, self.tokenizer)

    def matcher(self, spec: StructuredOutputsParams) -> "Matcher":
        """A fresh matcher, having accepted spec.resume_token_ids."""
        text = grammar_text(spec)
        compiled = self._cache.pop(text, None)
        if compiled is None:
            compiled = llg.LLMatcher(self.tokenizer, text, log_level=0)
        self._cache[text] = compiled
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        m = Matcher(compiled.deep_copy())
        for t in spec.resume_token_ids:
            m.accept(t)
        return m

    def bitmask(self, matchers: list["Matcher | None"]) -> torch.Tensor | None:
        """[rows, words] int32, bit t of a row set when token t is allowed (all set for rows
        without a grammar); None when no row has one."""
        if all(m is None for m in matchers):
            return None
        import llguidance.torch as llt  # ~5 s of CPU (torch._dynamo) a node without grammars skips

        mask = llt.allocate_token_bitmask(len(matchers), self.vocab_size)  # all allowed
        for i, m in enumerate(matchers):
            if m is not None:
                llt.fill_next_token_bitmask(m.inner, mask, i)
        return mask


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, inner: llg.LLMatcher):
        self.inner = inner

    def accept(self, token_id: int) -> bool:
        """False once the matcher has rejected a token (it then stays in error)."""
        if self.inner.is_stopped():  # past the grammar's end (ignore_eos): nothing to follow
            return True
        return self.inner.consume_token(token_id) and not self.inner.is_error()

    @property
    def error(self) -> str:
        return self.inner.get_error()
