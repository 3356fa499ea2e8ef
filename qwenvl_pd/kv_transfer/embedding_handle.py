"""What prefill needs to read one media item's vision embeddings out of an encode instance."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingHandle:
    """One item's embeddings in encode instance `instance_id`'s registered pool, contiguous
    from `address`: embeds [num_tokens, hidden_size], then deepstack [num_deepstack, num_tokens,
    hidden_size] (Qwen3-VL), all of `dtype`; pinned there until `lease_expires_unix_ms`."""
    key: str  # content hash + processor settings + vision weights fingerprint
    instance_id: str
    transfer_address: str  # "host:port" of the encoder's Mooncake transfer engine
    address: int
    nbytes: int
    num_tokens: int
    hidden_size: int
    dtype: str  # "bfloat16" | "float32" | ...
    vision_fingerprint: str  # of the weights that made it: a reader's must be equal
    num_deepstack: int = 0
    lease_expires_unix_ms: int = 0
    control_address: str = ""  # the encoder's gRPC address, for Release
    lease_id: str = ""
    in_store: bool = False  # also in the Mooncake Store under `key`
    signature: bytes = b""  # HMAC by an encoder that has the cluster secret (protos/auth.py)

    def __post_init__(self):
        rows = self.num_tokens * (1 + self.num_deepstack)
        if self.num_tokens <= 0 or self.hidden_size <= 0 or self.nbytes % (rows * self.hidden_size):
            raise ValueError(f"embedding handle {self.key[:16]}: {self.nbytes} bytes do not hold "
                             f"{rows} rows of {self.hidden_size}")

    @property
    def element_size(self) -> int:
        return self.nbytes // (self.num_tokens * (1 + self.num_deepstack) * self.hidden_size)
