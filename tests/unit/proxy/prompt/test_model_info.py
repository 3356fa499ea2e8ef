"""The proxy's tokenizer: the GIL-free encode equals transformers', and the size bound is exact."""
from transformers import AutoTokenizer

from qwenvl_pd.proxy.prompt.model_info import ProxyModel, longest_token_chars

TEXTS = ["Hello, world!", "<|im_start|>user\n你好<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>",
         "  leading spaces and\ttabs\n\n", "emoji 🤖 and é"]


def _model(tok) -> ProxyModel:
    return ProxyModel("m", "qwen2_5_vl", 100, tok, None, None, None, None, max_token_chars=longest_token_chars(tok))


def test_encode_equals_transformers_without_special_tokens_added(qwen_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    model = _model(tok)
    for text in TEXTS:
        assert model.encode(text) == tok.encode(text, add_special_tokens=False), text


def test_fewest_tokens_is_a_true_lower_bound(qwen_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    model = _model(tok)
    assert model.max_token_chars == 128  # Qwen's longest vocabulary entry
    assert [model.fewest_tokens(c) for c in (0, 1, 128, 129, 1 << 20)] == [0, 1, 1, 2, 8192]
    longest = " " * 128
    assert len(model.encode(longest)) >= model.fewest_tokens(len(longest))
    for text in TEXTS:
        assert len(model.encode(text)) >= model.fewest_tokens(len(text))
