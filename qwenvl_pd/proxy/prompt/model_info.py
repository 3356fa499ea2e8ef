"""What the proxy knows about the model, built from one prefill's ModelInfo: no model files here.

The tokenizer is loaded by transformers from the very tokenizer.json / tokenizer_config.json the
nodes use (written to a private temporary directory), so the proxy tokenizes exactly as prefill
and the offline LLM do: same class, same added tokens, same special-token handling.
"""
from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc

from qwenvl_pd.protos import auth
from qwenvl_pd.protos.channel import GRPC_OPTIONS
from qwenvl_pd.messages import ModelInfo
from qwenvl_pd.model.grid import VisionTokenIds
from qwenvl_pd.model.vision_config import VisionPreprocessConfig, config_from_dicts
from qwenvl_pd.protos import convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.proxy.prompt.detokenizer import TokenTable
from qwenvl_pd.proxy.prompt.templating import ChatTemplate, special_tokens_from_config

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ProxyModel:
    name: str  # the served model name clients must send
    family: str  # "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe"
    max_model_len: int
    tokenizer: Any  # a transformers fast tokenizer
    tokens: TokenTable
    template: ChatTemplate
    vision: VisionPreprocessConfig
    ids: VisionTokenIds
    max_token_chars: int = 1  # the longest token's text: a prompt of c characters is >= c / this tokens
    aliases: tuple[str, ...] = ()  # other names requests may send: a path's base name

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases

    def encode(self, text: str) -> list[int]:
        # the rendered template already holds every special token: add none. encode_batch, unlike
        # encode, releases the GIL: a long prompt tokenised on a worker leaves the event loop running
        return self.tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def fewest_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of `chars` characters, known without encoding."""
        return -(-chars // self.max_token_chars)


def longest_token_chars(tokenizer) -> int:
    # byte-level BPE: a vocabulary entry has one symbol per byte, and a character is >= 1 byte
    return max(len(t) for t in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True))


def _tokenizer(info: ModelInfo):
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="qwenvl-pd-tokenizer-") as d:
        Path(d, "tokenizer.json").write_bytes(info.tokenizer_json)
        Path(d, "tokenizer_config.json").write_bytes(info.tokenizer_config_json or b"{}")
        return AutoTokenizer.from_pretrained(d)


def _json(text: str, what: str) -> dict | None:
    if not text:
        return None
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{what} from prefill is not a JSON object")
    return data


def name_aliases(name: str) -> tuple[str, ...]:
    """A name that is a path or a hub id (vLLM serves the --model argument as given) also answers
    to its last component, the checkpoint directory's name."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return (base,) if base and base != name else ()


def build_model(info: ModelInfo, served_model_name: str = "") -> ProxyModel:
    if not info.chat_template:
        raise ValueError("the checkpoint has no chat template; /v1/chat/completions needs one")
    image = _json(info.preprocessor_config_json, "preprocessor_config.json") or {}
    video = _json(info.video_preprocessor_config_json, "video_preprocessor_config.json")
    vision = config_from_dicts(image, "preprocessor_config.json", video, "video_preprocessor_config.json")
    tokenizer = _tokenizer(info)
    special = special_tokens_from_config(info.tokenizer_config_json or b"{}")
    name = served_model_name or info.served_model_name
    return ProxyModel(
        name=name, aliases=name_aliases(name), family=info.family,
        max_model_len=info.max_model_len, tokenizer=tokenizer, tokens=TokenTable(tokenizer),
        template=ChatTemplate(info.chat_template, special), vision=vision,
        ids=VisionTokenIds(info.vision_start_token_id, info.vision_end_token_id,
                           info.image_token_id, info.video_token_id),
        max_token_chars=longest_token_chars(tokenizer))


async def fetch_model_info(addresses: Sequence[str] | Callable[[], Sequence[str]], timeout_s: float,
                           secret: bytes = b"") -> ModelInfo:
    """GetModelInfo from the first prefill that answers, retrying until timeout_s.
    `addresses` may be a callable, so instances discovered meanwhile are tried too."""
    deadline = time.monotonic() + timeout_s
    last = "no prefill instance known yet"
    while time.monotonic() < deadline:
        for address in (addresses() if callable(addresses) else addresses):
            async with auth.channel(address, secret, GRPC_OPTIONS) as channel:
                try:
                    reply = await pb_grpc.PrefillStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
                    return convert.from_proto(reply)
                except grpc.aio.AioRpcError as e:
                    last = f"{address}: {e.code().name} {e.details()}"
        await asyncio.sleep(1.0)
    raise TimeoutError(f"no prefill answered GetModelInfo within {timeout_s:.0f}s (last: {last})")
