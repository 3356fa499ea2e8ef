"""Shared fixtures of the proxy tests: a real Qwen tokenizer written from the bundled vocabulary."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from qwenvl_pd.model.tokenizer_files import write_tokenizer


def template_source(family: str) -> str:
    return (resources.files("qwenvl_pd.model") / "templates" / f"{family}.jinja").read_text()


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """Qwen2.5-VL tokenizer files whose tokenizer_config.json carries the family's chat template,
    as a downloaded checkpoint's does."""
    d = tmp_path_factory.mktemp("proxy_tokenizer")
    write_tokenizer(d, "qwen2_5_vl")
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template_source("qwen2_5_vl")
    cfg_file.write_text(json.dumps(cfg, ensure_ascii=False))
    return d


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
