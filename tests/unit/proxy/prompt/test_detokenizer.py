"""Incremental detokenisation and stop strings with the real Qwen tokenizer."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from qwenvl_pd.proxy.prompt.detokenizer import IncrementalDetokenizer, TokenTable

MIXED = "你好，世界！🌍🚀 Ünïcödé — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 テスト 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def table(qwen_tokenizer):
    return TokenTable(qwen_tokenizer)


def stream(table, ids, stop=(), skip=True):
    d = IncrementalDetokenizer(table, stop, skip)
    pieces = [d.add(i) for i in ids]
    return d, [p for p, _ in pieces], d.flush()


def test_multibyte_text_reassembles_exactly(qwen_tokenizer, table):
    ids = qwen_tokenizer.encode(MIXED)
    # the case under test: some tokens end inside a character
    assert any(not _valid_utf8(table.bytes(i)) for i in ids)
    d, pieces, tail = stream(table, ids)
    assert "".join(pieces) + tail == MIXED == qwen_tokenizer.decode(ids) == d.text
    assert tail == "" and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a partial character was held, not shown as U+FFFD


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_table_accepts_the_hf_tokenizer_directly(qwen_tokenizer):
    d = IncrementalDetokenizer(qwen_tokenizer)
    text = "".join(d.add(i)[0] for i in qwen_tokenizer.encode("ok 🙂")) + d.flush()
    assert text == "ok 🙂"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_decode(qwen_tokenizer, table, skip):
    ids = qwen_tokenizer.encode("<|im_start|>assistant\nhi <tool_call> 好<|im_end|><|endoftext|>")
    _, pieces, tail = stream(table, ids, skip=skip)
    assert "".join(pieces) + tail == qwen_tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<tool_call>" in "".join(pieces)) and (("<|im_end|>" in "".join(pieces)) != skip)


@pytest.fixture(scope="module")
def resaved_tokenizer(qwen_tokenizer_dir, tmp_path_factory):
    """The Qwen tokenizer with its config's special-token list dropped, as a fine-tune may save it:
    tokenizer.json still flags <|im_start|> and the vision tokens special."""
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("resaved")
    shutil.copy(qwen_tokenizer_dir / "tokenizer.json", d)
    cfg = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    for key in ("additional_special_tokens", "extra_special_tokens"):
        cfg.pop(key, None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("skip", [True, False])
def test_tokens_flagged_special_in_tokenizer_json_are_skipped_as_transformers_does(resaved_tokenizer, skip):
    ids = resaved_tokenizer.encode("<|im_start|>assistant\nhi<|vision_start|> 好<tool_call><|im_end|>")
    assert 151644 not in resaved_tokenizer.all_special_ids  # the case under test
    _, pieces, tail = stream(TokenTable(resaved_tokenizer), ids, skip=skip)
    assert "".join(pieces) + tail == resaved_tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_start|>" in "".join(pieces)) != skip


def test_dangling_partial_character_flushes_as_replacement(qwen_tokenizer, table):
    ids = qwen_tokenizer.encode("𓀀")  # one character, three tokens
    assert len(ids) == 3
    _, pieces, tail = stream(table, ids[:-1])
    assert "".join(pieces) == "" and tail == qwen_tokenizer.decode(ids[:-1]) == "\ufffd"


def test_stop_string_spanning_tokens_is_cut_and_not_emitted(qwen_tokenizer, table):
    ids = qwen_tokenizer.encode("The answer is 42. Done")
    assert [qwen_tokenizer.decode([i]) for i in ids][3:6] == [" ", "4", "2"]
    d, pieces, tail = stream(table, ids, stop=["42."])
    assert "".join(pieces) == "The answer is " == d.text and tail == ""
    assert d.stopped and d.stop_reason == "42."
    assert pieces[3:6] == [" ", "", ""]  # "4" and "42" were held: they could start "42."
    assert d.add(ids[0]) == ("", True)


def test_held_text_is_released_on_a_false_start(qwen_tokenizer, table):
    ids = qwen_tokenizer.encode("a 4 b 4")
    d, pieces, tail = stream(table, ids, stop=["42"])
    assert "".join(pieces) + tail == "a 4 b 4" and not d.stopped and d.stop_reason is None
    assert tail == "4"  # the final "4" waited for a "2" that never came


def test_stop_inside_multibyte_text(qwen_tokenizer, table):
    d, pieces, tail = stream(table, qwen_tokenizer.encode("你好世界再见"), stop=["世界"])
    assert "".join(pieces) == "你好" and d.stopped and tail == ""


def test_earliest_stop_wins_and_stop_returned_flag(qwen_tokenizer, table):
    d = IncrementalDetokenizer(table, ["world", "lo w"])
    out = [d.add(i) for i in qwen_tokenizer.encode("hello world, again")]
    assert "".join(t for t, _ in out) == "hel" and d.stop_reason == "lo w"
    flags = [s for _, s in out]
    assert flags[-1] and flags.index(True) < len(flags) - 1  # stopped before the input ran out
    assert d.flush() == ""


def test_stop_at_the_very_start(qwen_tokenizer, table):
    d, pieces, tail = stream(table, qwen_tokenizer.encode("\nline"), stop=["\n"])
    assert (d.text, d.stopped, tail) == ("", True, "")


@pytest.mark.parametrize("seed", range(8))
def test_random_texts_and_stops_match_a_full_decode(qwen_tokenizer, table, seed):
    rng = random.Random(seed)
    alphabet = list("ab 12.,\n") + list("你好世界中文") + ["😀", "🚀", "é", "ß", "👩‍👧"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 40)))
    start = rng.randrange(len(text))
    stop = text[start:start + rng.randint(1, 4)]
    d, pieces, tail = stream(table, qwen_tokenizer.encode(text), stop=[stop, "never-there"])
    want = qwen_tokenizer.decode(qwen_tokenizer.encode(text))
    assert "".join(pieces) + tail == want[:want.find(stop)]
    assert not any("\ufffd" in p for p in pieces)


def test_token_table_bytes_and_text(qwen_tokenizer, table):
    first, second, third = qwen_tokenizer.encode("𓀀")
    assert table.text(first) == "\ufffd"
    assert table.bytes(first) + table.bytes(second) + table.bytes(third) == "𓀀".encode()
    assert table.bytes(qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    hello = qwen_tokenizer.encode(" hello")
    assert len(hello) == 1 and table.bytes(hello[0]) == b" hello" and table.text(hello[0]) == " hello"
    assert table.is_special(qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert not table.is_special(qwen_tokenizer.convert_tokens_to_ids("<tool_call>"))
    # ids of the padded vocabulary past the tokenizer's (the model may sample them) are empty text
    assert table.bytes(151868) == b"" and table.text(10**7) == ""


def test_non_byte_level_tokenizers_are_refused():
    class NotByteLevel:
        backend_tokenizer = type("B", (), {"decoder": object()})()

    with pytest.raises(ValueError, match="byte-level"):
        TokenTable(NotByteLevel())
