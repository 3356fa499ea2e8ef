"""The encode node's settings, read once from the command line."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EncodeConfig:
    model: str
    port: int = 50053
    host: str = "127.0.0.1"          # address peers reach gRPC and Mooncake at
    bind: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    embedding_cache_bytes: int = 1 << 30
    embedding_store: str = ""         # a mooncake_master "host:port"; "": no store tier
    store_segment_bytes: int = 256 << 20  # what this instance lends the store
    lease_seconds: float = 30.0
    max_encode_batch_tokens: int = 16384  # merged vision tokens per tower forward
    transfer_protocol: str = "tcp"
    transfer_device: str = ""
    instance_id: str = ""
    cluster_secret: bytes = field(default=b"", repr=False)
    cpus: tuple[int, ...] = ()
    limit_images: int = 16            # per Encode request
    limit_videos: int = 2
    drain_seconds: float = 30.0       # on SIGTERM: NOT_SERVING, then this long for live leases
    max_concurrent_rpcs: int = 1024

    def __post_init__(self):
        for name in ("embedding_cache_bytes", "max_encode_batch_tokens", "lease_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.store_segment_bytes < 0:
            raise ValueError("--embedding-store-segment-gib must be >= 0")
