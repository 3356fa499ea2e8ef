"""The typed handoff between proxy, prefill and decode.

Plain frozen dataclasses with the field names of qwenvl_pd/protos/qwenvl_pd.proto; the wire
conversion lives at the gRPC edge (qwenvl_pd.protos.convert), so nothing here imports protobuf.
Sequences are stored as tuples, whatever the caller passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint
from qwenvl_pd.sampling_params import SamplingParams

__all__ = ["MediaItem", "PrefillRequest", "SampledToken", "PromptLogprobs", "PrefillResult", "DecodeRequest",
           "PrefillStreamEvent", "KVProgress", "TokenEvent", "LoadReport", "ModelInfo", "KVHandle", "LayoutFingerprint",
           "FinishReason", "EmbeddingHandle", "EncodeRequest", "EncodeResult", "EmbeddingRelease"]

MEDIA_KINDS = ("image", "video")
ROLES = ("prefill", "decode")  # a PD cluster needs both
ENCODE = "encode"  # optional: without one, prefill runs the vision tower itself
ALL_ROLES = ROLES + (ENCODE,)


def _tuples(obj, *names: str) -> None:
    for name in names:
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class MediaItem:
    """One image or video as the client sent it (encoded bytes, never pixels), with the grid
    and content hash the proxy computed."""
    kind: str  # "image" | "video"
    content_hash: str
    grid_thw: tuple[int, int, int]
    data: bytes = b""  # the image or video file
    frames: tuple[bytes, ...] = ()  # or a video as encoded frames
    fps: float | None = None  # frame rate of `frames` (files carry their own)
    second_per_grid_t: float | None = None  # Qwen2.5-VL video
    timestamps: tuple[float, ...] = ()  # Qwen3-VL video: seconds of each temporal step
    # set: prefill reads these embeddings instead of encoding; data and frames may be empty
    embedding: EmbeddingHandle | None = None

    def __post_init__(self):
        _tuples(self, "grid_thw", "frames", "timestamps")
        _check(self.kind in MEDIA_KINDS, f"media kind must be one of {MEDIA_KINDS}, not {self.kind!r}")
        _check(len(self.grid_thw) == 3, f"grid_thw must be (t, h, w), not {self.grid_thw}")
        _check(not (self.data and self.frames), "a media item has data or frames, not both")
        _check(bool(self.data or self.frames or self.embedding),
               "a media item needs data, frames or an embedding handle")
        _check(not self.frames or self.kind == "video", "only a video comes as frames")


@dataclass(frozen=True)
class PrefillRequest:
    """proxy -> prefill: the expanded prompt, its media in placeholder order, sampling."""
    request_id: str
    prompt_token_ids: tuple[int, ...]
    media: tuple[MediaItem, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    lease_ms: int = 0  # wanted KV lease; 0: the prefill node's default
    cache_salt: str = ""  # prefix-cache hits only among requests of the same salt

    def __post_init__(self):
        _tuples(self, "prompt_token_ids", "media")


@dataclass(frozen=True)
class EncodeRequest:
    """proxy -> encode: a request's media, as the proxy would send them to prefill."""
    request_id: str
    media: tuple[MediaItem, ...]
    lease_ms: int = 0  # 0: the encoder's default

    def __post_init__(self):
        _tuples(self, "media")


@dataclass(frozen=True)
class EncodeResult:
    """encode -> proxy: one handle per media item, in order."""
    handles: tuple[EmbeddingHandle, ...]
    hits: int = 0  # items the pool (or the store) already held

    def __post_init__(self):
        _tuples(self, "handles")


@dataclass(frozen=True)
class EmbeddingRelease:
    """prefill (or proxy) -> encode: unpin these leases of instance `instance_id`."""
    lease_ids: tuple[str, ...]
    instance_id: str = ""

    def __post_init__(self):
        _tuples(self, "lease_ids")


@dataclass(frozen=True)
class SampledToken:
    """One sampled token; top_logprobs are (token_id, logprob) pairs, best first."""
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "top_logprobs", tuple(tuple(p) for p in self.top_logprobs))


@dataclass(frozen=True)
class PromptLogprobs:
    """prefill -> proxy (SamplingParams.prompt_logprobs): for prompt token i + 1, i from 0, its
    raw logprob given the tokens before it, its rank (1 = best) and the `num_top` best
    (token id, logprob) there, flat: position i's are top_ids[i * num_top:(i + 1) * num_top]."""
    num_top: int
    logprobs: tuple[float, ...] = ()
    ranks: tuple[int, ...] = ()
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()

    def __post_init__(self):
        _tuples(self, "logprobs", "ranks", "top_ids", "top_logprobs")
        n = len(self.logprobs)
        _check(len(self.ranks) == n and len(self.top_ids) == len(self.top_logprobs) == n * self.num_top,
               f"prompt logprobs: {n} positions need {n} ranks and {n} x {self.num_top} top entries")

    def __len__(self) -> int:
        return len(self.logprobs)

    def top(self, i: int) -> tuple[tuple[int, float], ...]:
        span = slice(i * self.num_top, (i + 1) * self.num_top)
        return tuple(zip(self.top_ids[span], self.top_logprobs[span]))


@dataclass(frozen=True)
class PrefillResult:
    """prefill -> proxy: the first token and where its KV waits for decode."""
    request_id: str
    first_token: SampledToken
    mrope_position_delta: int
    prompt_len: int
    handle: KVHandle | None = None  # None when the first token already ends the request
    num_cached_tokens: int = 0  # prefix-cache hits
    finish_reason: str = ""  # "stop" | "length" when no decode is needed
    prompt_logprobs: PromptLogprobs | None = None  # when the sampling asked for them


@dataclass(frozen=True)
class DecodeRequest:
    """proxy -> decode: everything decode needs to continue a prefilled request."""
    request_id: str
    handle: KVHandle
    first_token: SampledToken
    prompt_token_ids: tuple[int, ...]  # for repetition penalty and stop state
    prompt_len: int
    mrope_position_delta: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_output_tokens: int = 1  # already produced, the first token included
    # handle is PrefillStream's announce: the KV is read layer group by group while prefill
    # computes; first_token and mrope_position_delta then come from WatchKV's last message
    layerwise: bool = False

    def __post_init__(self):
        _tuples(self, "prompt_token_ids")


@dataclass(frozen=True)
class PrefillStreamEvent:
    """prefill -> proxy (PrefillStream): the KV announce first, the result last."""
    announce: KVHandle | None = None  # block ids allocated before compute; no lease yet
    result: PrefillResult | None = None


@dataclass(frozen=True)
class KVProgress:
    """prefill -> decode (WatchKV), cumulative: prompt tokens [0, tokens_ready) are final in
    every layer, tokens [0, chunk_tokens) (the chunk being computed) in layers [0, layers_ready)."""
    tokens_ready: int
    chunk_tokens: int = 0
    layers_ready: int = 0
    result: PrefillResult | None = None  # the last message: first token, handle under its lease


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token (or an end without one), from the gRPC edge to the response builder:
    decode -> proxy per streamed token, and the proxy's backend -> its request runner (whose
    first event is prefill's token). The last one has a finish_reason."""
    token: SampledToken | None = None  # None on an end event that carries no token
    finish_reason: str = ""  # "" while running; "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # produced so far, this token included
    error: str = ""  # why, when finish_reason is "error"
    num_cached_tokens: int = 0  # first event of a sample: prompt tokens served from prefix cache
    prompt_logprobs: PromptLogprobs | None = None  # first event of a sample, when asked for

    def __post_init__(self):
        allowed = FinishReason.on_the_wire()
        _check(self.finish_reason in allowed, f"finish_reason must be one of {allowed}, not {self.finish_reason!r}")


@dataclass(frozen=True)
class LoadReport:
    """One instance's load and counters, for routing and metrics."""
    role: str  # "prefill" | "decode"
    instance_id: str
    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    kv_transfers_total: int = 0
    kv_transfer_bytes_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    prefix_cache_queries: int = 0  # in blocks
    prefix_cache_hits: int = 0  # in blocks
    requests_total: int = 0  # requests admitted to the engine since start
    # encode: items served from its pool / the store, items it encoded, seconds in the tower
    embedding_hits: int = 0
    embedding_store_hits: int = 0
    embedding_misses: int = 0
    encode_seconds_total: float = 0.0
    embedding_bytes_used: int = 0
    embedding_bytes_total: int = 0
    embedding_leases: int = 0  # entries pinned now
    # prefill: embeddings read from encoders (or the store), and reads that failed
    embedding_reads: int = 0
    embedding_read_bytes: int = 0
    embedding_read_failures: int = 0

    def __post_init__(self):
        _check(self.role in ALL_ROLES, f"role must be one of {ALL_ROLES}, not {self.role!r}")


@dataclass(frozen=True)
class ModelInfo:
    """All the proxy needs from the checkpoint, so that it mounts no model files."""
    served_model_name: str
    family: str
    tokenizer_json: bytes
    tokenizer_config_json: bytes
    chat_template: str
    preprocessor_config_json: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int
    video_preprocessor_config_json: str = ""  # "" when the checkpoint has none
    generation_config_json: str = ""  # "" when the checkpoint has none

    def __post_init__(self):
        _tuples(self, "eos_token_ids")
