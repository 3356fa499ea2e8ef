"""What a prefill or decode node holds: model, engine, KV region registered with Mooncake."""
import dataclasses
import hashlib
import socket
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from qwenvl_pd.engine.stack import StackConfig, build_stack
from qwenvl_pd.kv_transfer.handle import LayoutFingerprint
from qwenvl_pd.kv_transfer.layout import fingerprint_for
from qwenvl_pd.messages import LoadReport, ModelInfo
from qwenvl_pd.node.model_info import model_info
from qwenvl_pd.node.rank_kv import TransferOptions, setup_rank_kv


@dataclass(frozen=True)
class NodeConfig:
    role: str                      # "prefill" | "decode"
    port: int
    stack: StackConfig             # the checkpoint, its device and the engine serving it
    host: str = "127.0.0.1"        # address peers use for gRPC and Mooncake
    bind: str = "0.0.0.0"
    served_model_name: str = ""
    transfer_protocol: str = "tcp"
    transfer_device: str = ""
    transfer_timeout_s: float = 10.0
    lease_seconds: float = 30.0
    drain_seconds: float = 30.0    # on SIGTERM: NOT_SERVING, then this long for running RPCs
    cluster_secret: bytes = field(default=b"", repr=False)  # b"": node RPCs are not checked
    instance_id: str = ""
    max_queued_requests: int = 1024  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    kv_layer_group: int = 4  # prefill: layers per layer-wise KV report; 0 refuses layer-wise
    cpus: tuple[int, ...] = ()       # cores this node and its ranks are pinned to; (): not pinned
    allowed_prefills: tuple[str, ...] = ()  # decode: the only prefill hosts it reads KV from; (): any
    allowed_encoders: tuple[str, ...] = ()  # prefill: the only encoder hosts it reads embeddings from
    embedding_read_buffer_mib: int = 256  # prefill: registered once, on the first embedding read
    embedding_store: str = ""  # prefill: a mooncake_master whose Mooncake Store backs encoder reads

    def __post_init__(self):
        if self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be >= 1")
        if self.embedding_read_buffer_mib < 1:
            raise ValueError("--embedding-read-buffer-mib must be >= 1")
        if self.kv_layer_group < 0:
            raise ValueError("--kv-layer-group must be >= 0 (0: no layer-wise KV streaming)")

    @property
    def max_concurrent_rpcs(self) -> int:
        # every queued or running request holds one RPC; the rest is room for health, load, release
        return self.max_queued_requests + self.stack.engine.max_num_seqs + 64


class Runtime:
    def __init__(self, cfg: NodeConfig):
        if cfg.role == "prefill" and cfg.transfer_timeout_s >= cfg.lease_seconds:
            raise ValueError("transfer timeout must be shorter than the lease: a late read could "
                             "touch blocks the lease already gave away")
        self.cfg = cfg
        self.instance_id = cfg.instance_id or f"{cfg.role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        opts = TransferOptions(cfg.role, cfg.host, cfg.transfer_protocol, cfg.transfer_device,
                               cfg.transfer_timeout_s)
        self.stack = build_stack(cfg.stack, rank_setup=partial(setup_rank_kv, opts))
        self.model_config, self.tokenizer = self.stack.config, self.stack.tokenizer
        self.inputs, self.model, self.engine = self.stack.inputs, self.stack.model, self.stack.engine
        self.dtype, self.kv = self.stack.dtype, self.stack.rank_state
        self.transfer, self.region = self.kv.transfer, self.kv.region
        self.max_model_len = self.engine.cfg.max_model_len  # the checkpoint's when the config had none
        self.fingerprint = self._fingerprint()
        try:
            self.engine.check_pool()
        except ValueError:
            self.close()
            raise

    def _fingerprint(self) -> LayoutFingerprint:
        # the model identity is the config's content: same architecture and sizes, same layout
        digest = hashlib.sha256(Path(self.cfg.stack.model, "config.json").read_bytes()).hexdigest()[:16]
        text = self.model_config.text
        return fingerprint_for(f"{self.model_config.family}:{digest}", self.dtype,
                               self.engine.cfg.block_size, text.num_layers, text.num_kv_heads,
                               text.head_dim, self.stack.tp.size,
                               quantization=self.model.quantization)

    def model_info(self) -> ModelInfo:
        return model_info(self.cfg.stack.model, self.model_config, self.max_model_len, self.cfg.served_model_name)

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
