"""What a prefill or decode node holds: model, engine, KV region registered with Mooncake."""
import dataclasses
import hashlib
import json
import socket
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from qwenvl_pd.cpus import threads_for
from qwenvl_pd.engine.config import EngineConfig
from qwenvl_pd.engine.stack import StackConfig, build_stack
from qwenvl_pd.kv_transfer.handle import LayoutFingerprint
from qwenvl_pd.kv_transfer.layout import fingerprint_for
from qwenvl_pd.messages import LoadReport, ModelInfo
from qwenvl_pd.node.rank_kv import TransferOptions, setup_rank_kv


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
    drain_seconds: float = 30.0    # on SIGTERM: NOT_SERVING, then this long for running RPCs
    cluster_secret: bytes = field(default=b"", repr=False)  # b"": node RPCs are not checked
    instance_id: str = ""
    limit_mm_per_prompt: dict = field(default_factory=dict, hash=False)
    engine: EngineConfig = EngineConfig()
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    threads: int = 0
    quantization: str | None = None  # "ascend" | "none"; None: from the checkpoint
    max_queued_requests: int = 1024  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    kv_layer_group: int = 4  # prefill: layers per layer-wise KV report; 0 refuses layer-wise
    cpus: tuple[int, ...] = ()       # cores this node and its ranks are pinned to; (): not pinned

    def __post_init__(self):
        if self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be >= 1")
        if self.kv_layer_group < 0:
            raise ValueError("--kv-layer-group must be >= 0 (0: no layer-wise KV streaming)")

    @property
    def max_concurrent_rpcs(self) -> int:
        # every queued or running request holds one RPC; the rest is room for health, load, release
        return self.max_queued_requests + self.engine.max_num_seqs + 64

    @property
    def rank_threads(self) -> int:
        return threads_for(self.cpus, self.threads, self.tensor_parallel_size)

    def stack(self) -> StackConfig:
        return StackConfig(self.model, self.max_model_len, self.device, self.dtype,
                           self.tensor_parallel_size, self.enable_expert_parallel, self.rank_threads,
                           self.limit_mm_per_prompt, self.engine, self.quantization)


class Runtime:
    def __init__(self, cfg: NodeConfig):
        if cfg.role == "prefill" and cfg.transfer_timeout_s >= cfg.lease_seconds:
            raise ValueError("transfer timeout must be shorter than the lease: a late read could "
                             "touch blocks the lease already gave away")
        self.cfg = cfg
        self.instance_id = cfg.instance_id or f"{cfg.role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        opts = TransferOptions(cfg.role, cfg.host, cfg.transfer_protocol, cfg.transfer_device,
                               cfg.transfer_timeout_s)
        self.stack = build_stack(cfg.stack(), rank_setup=partial(setup_rank_kv, opts))
        self.model_config, self.tokenizer = self.stack.config, self.stack.tokenizer
        self.inputs, self.model, self.engine = self.stack.inputs, self.stack.model, self.stack.engine
        self.dtype, self.kv = self.stack.dtype, self.stack.rank_state
        self.transfer, self.region = self.kv.transfer, self.kv.region
        self.fingerprint = self._fingerprint()
        try:
            self.engine.check_pool()
        except ValueError:
            self.close()
            raise

    def _fingerprint(self) -> LayoutFingerprint:
        # the model identity is the config's content: same architecture and sizes, same layout
        digest = hashlib.sha256(Path(self.cfg.model, "config.json").read_bytes()).hexdigest()[:16]
        text = self.model_config.text
        return fingerprint_for(f"{self.model_config.family}:{digest}", self.dtype,
                               self.cfg.engine.block_size, text.num_layers, text.num_kv_heads,
                               text.head_dim, self.stack.tp.size,
                               quantization=self.model.quantization)

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

    def failure(self) -> str | None:
        """Why this instance can no longer serve (a tensor-parallel rank died), or None."""
        dead = self.stack.ranks.dead() if self.stack.ranks is not None else []
        return f"tensor-parallel rank(s) {dead} died" if dead else None

    def close(self, failed: bool = False) -> None:
        if failed and self.stack.ranks is not None:
            self.stack.ranks.kill()  # a rank is gone or stuck: no collective goodbye
            self.kv.transfer.close()
            return
        self.kv.close()
        self.stack.close()


def load_report(rt: Runtime, role: str, **transfer) -> LoadReport:
    return LoadReport(role=role, instance_id=rt.instance_id, **dataclasses.asdict(rt.engine.load()), **transfer)


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
