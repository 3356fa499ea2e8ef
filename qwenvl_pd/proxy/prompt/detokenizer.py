"""Streaming detokenisation with stop strings.

Qwen tokenizers are byte-level BPE: a token is a run of bytes, and one character (Chinese, emoji)
may be split across tokens. Rather than re-decoding a sliding window of ids and guessing from a
trailing U+FFFD, we map each token to its bytes and feed them to an incremental UTF-8 decoder,
which emits a character exactly when its last byte arrives. The concatenated stream therefore
equals ``tokenizer.decode(all_ids)`` (same U+FFFD for truly invalid bytes, only at the end).

Stop strings: text that could still become the start of a stop string is held back; when a stop
string completes, the output is cut right before it and the stop string itself is not emitted
(OpenAI and vLLM behaviour).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

__all__ = ["TokenTable", "IncrementalDetokenizer"]


def _unicode_to_byte() -> dict[str, int]:
    # inverse of GPT-2's byte -> printable character map that ByteLevel BPE vocabularies use
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenTable:
    """token id -> bytes and special-ness for a byte-level BPE tokenizer; cached, so build one
    per tokenizer and share it between requests."""

    def __init__(self, tokenizer: Any) -> None:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ != "ByteLevel":
            raise ValueError(f"only byte-level BPE tokenizers are supported (decoder is "
                             f"{type(decoder).__name__})")
        self._tok = tokenizer
        self._u2b = _unicode_to_byte()
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        # the added tokens' own flag (tokenizer.json's "special"), which transformers' and vLLM's
        # decode(skip_special_tokens=True) skip: a re-saved tokenizer may flag tokens special
        # that its config no longer lists in all_special_ids
        self._special = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._cache: dict[int, bytes] = {}

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def bytes(self, token_id: int) -> bytes:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._lookup(token_id)
        return got

    def text(self, token_id: int) -> str:
        """One token on its own (a partial character shows as U+FFFD), e.g. for logprobs."""
        return self.bytes(token_id).decode("utf-8", "replace")

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tok.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            # the model's padded vocabulary (config 151936 > tokenizer's): text "", as vLLM has it
            return b""
        # characters outside the byte map pass through as UTF-8, as the ByteLevel decoder does
        return b"".join(bytes([self._u2b[c]]) if c in self._u2b else c.encode("utf-8") for c in piece)


class IncrementalDetokenizer:
    """Feed token ids one at a time; get the text that is safe to show now.

    ``add(token_id) -> (new_text, stopped)``; once stopped, further tokens add nothing.
    ``flush()`` at the end of generation returns what was held back. ``text`` is everything
    emitted so far; ``stop_reason`` the stop string that ended the output, if any.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._table = tokenizer if isinstance(tokenizer, TokenTable) else TokenTable(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # decoded, not yet emitted: may be the start of a stop string
        self._emitted: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None
        self.num_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def add(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.num_tokens += 1
        if self._skip_special and self._table.is_special(token_id):
            return "", False
        return self._push(self._utf8.decode(self._table.bytes(token_id)), final=False), self.stopped

    def flush(self) -> str:
        """End of generation: release held text (and a dangling partial character as U+FFFD)."""
        if self.stopped:
            return ""
        return self._push(self._utf8.decode(b"", final=True), final=True)

    def _push(self, piece: str, final: bool) -> str:
        self._held += piece
        hit = self._first_stop()
        if hit is not None:
            cut, self.stop_reason = hit
            out, self._held, self.stopped = self._held[:cut], "", True
        else:
            keep = 0 if final else self._stop_prefix_len()
            out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        if out:
            self._emitted.append(out)
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        # the earliest occurrence wins; held text holds every possible start (see _stop_prefix_len)
        hits = [(i, order, s) for order, s in enumerate(self._stop) if (i := self._held.find(s)) >= 0]
        return (min(hits)[0], min(hits)[2]) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the held text that begins some stop string."""
        held = self._held
        for k in range(min(len(held), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            tail = held[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
