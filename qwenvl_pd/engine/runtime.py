"""What a prefill or decode node holds: model, engine, KV region registered with Mooncake."""
import hashlib
import json
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl_pd.kv_transfer.engine import KVTransferEngine
from qwenvl_pd.kv_transfer.handle import LayoutFingerprint
from qwenvl_pd.kv_transfer.layout import Region, fingerprint_for
from qwenvl_pd.messages import ModelInfo
from qwenvl_pd.model.inputs import InputProcessor
from qwenvl_pd.model.loader import load_model
from qwenvl_pd.platform import default_dtype, detect_device


@dataclass(frozen=True)
class NodeConfig:
    role: str                      # "prefill" | "decode"
    model: str
    port: int
    host: str = "127.0.0.1"        # address peers use for gRPC and Mooncake
    bind: str = "0.0.0.0"
    served_model_name: str = ""
    max_model_len: int = 8192
    device: str = "auto"
    dtype: str = "auto"
    transfer_protocol: str = "tcp"
    transfer_device: str = ""
    transfer_timeout_s: float = 10.0
    lease_seconds: float = 30.0
    instance_id: str = ""
    limit_mm_per_prompt: dict = field(default_factory=dict, hash=False)
    engine: EngineConfig = EngineConfig()


class Runtime:
    def __init__(self, cfg: NodeConfig):
        if cfg.role == "prefill" and cfg.transfer_timeout_s >= cfg.lease_seconds:
            raise ValueError("transfer timeout must be shorter than the lease: a late read could "
                             "touch blocks the lease already gave away")
        self.cfg = cfg
        self.instance_id = cfg.instance_id or f"{cfg.role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.model_config = ModelConfig.from_hf(cfg.model)
        device = detect_device(cfg.device)
        self.dtype = default_dtype(device, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.inputs = InputProcessor(cfg.model, self.model_config, self.tokenizer.encode,
                                     cfg.max_model_len, cfg.limit_mm_per_prompt)
        self.model = load_model(cfg.model, self.model_config, self.dtype, device)
        self.engine = LLMEngine(self.model, self.model_config, cfg.engine, self.dtype)
        self.transfer = KVTransferEngine(cfg.host, cfg.transfer_protocol, cfg.transfer_device,
                                         timeout_s=cfg.transfer_timeout_s)
        self.transfer.register(self.engine.kv_cache)
        self.region = Region.from_tensor(self.engine.kv_cache)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> LayoutFingerprint:
        # the model identity is the config's content: same architecture and sizes, same layout
        digest = hashlib.sha256(Path(self.cfg.model, "config.json").read_bytes()).hexdigest()[:16]
        text = self.model_config.text
        return fingerprint_for(f"{self.model_config.family}:{digest}", self.dtype,
                               self.cfg.engine.block_size, text.num_layers, text.num_kv_heads,
                               text.head_dim)

    def model_info(self) -> ModelInfo:
        d, cfg = Path(self.cfg.model), self.model_config
        return ModelInfo(
            served_model_name=self.cfg.served_model_name or d.name, family=cfg.family,
            tokenizer_json=_read(d / "tokenizer.json").encode(),
            tokenizer_config_json=_read(d / "tokenizer_config.json").encode(),
            chat_template=_chat_template(d), preprocessor_config_json=_read(d / "preprocessor_config.json"),
            max_model_len=self.cfg.max_model_len, eos_token_ids=cfg.eos_token_ids,
            vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            video_preprocessor_config_json=_read(d / "video_preprocessor_config.json"),
            generation_config_json=_read(d / "generation_config.json"))

    def close(self) -> None:
        self.transfer.close()


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _chat_template(model_dir: Path) -> str:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        text = _read(model_dir / name)
        if not text:
            continue
        if name.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if template:
            return template
    return ""
