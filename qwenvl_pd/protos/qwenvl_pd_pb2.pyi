from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "max_completion_tokens", "min_tokens", "stop_token_ids", "ignore_eos", "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "skip_special_tokens", "structured_outputs", "prompt_logprobs", "logit_bias")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    max_tokens: int
    max_completion_tokens: int
    min_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    skip_special_tokens: bool
    structured_outputs: StructuredOutputsParams
    prompt_logprobs: int
    logit_bias: _containers.ScalarMap[int, float]
    def __init__(self, n: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_completion_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., skip_special_tokens: _Optional[bool] = ..., structured_outputs: _Optional[_Union[StructuredOutputsParams, _Mapping]] = ..., prompt_logprobs: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ...) -> None: ...

class StructuredOutputsParams(_message.Message):
    __slots__ = ("json", "regex", "choice", "grammar", "json_object", "resume_token_ids")
    JSON_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    json: str
    regex: str
    choice: _containers.RepeatedScalarFieldContainer[str]
    grammar: str
    json_object: bool
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, json: _Optional[str] = ..., regex: _Optional[str] = ..., choice: _Optional[_Iterable[str]] = ..., grammar: _Optional[str] = ..., json_object: _Optional[bool] = ..., resume_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GridTHW(_message.Message):
    __slots__ = ("t", "h", "w")
    T_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    t: int
    h: int
    w: int
    def __init__(self, t: _Optional[int] = ..., h: _Optional[int] = ..., w: _Optional[int] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("kind", "data", "frames", "fps", "content_hash", "grid_thw", "second_per_grid_t", "timestamps", "embedding")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[MediaItem.Kind]
        IMAGE: _ClassVar[MediaItem.Kind]
        VIDEO: _ClassVar[MediaItem.Kind]
    KIND_UNSPECIFIED: MediaItem.Kind
    IMAGE: MediaItem.Kind
    VIDEO: MediaItem.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    SECOND_PER_GRID_T_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    kind: MediaItem.Kind
    data: bytes
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    fps: float
    content_hash: str
    grid_thw: GridTHW
    second_per_grid_t: float
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    embedding: EmbeddingHandle
    def __init__(self, kind: _Optional[_Union[MediaItem.Kind, str]] = ..., data: _Optional[bytes] = ..., frames: _Optional[_Iterable[bytes]] = ..., fps: _Optional[float] = ..., content_hash: _Optional[str] = ..., grid_thw: _Optional[_Union[GridTHW, _Mapping]] = ..., second_per_grid_t: _Optional[float] = ..., timestamps: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Union[EmbeddingHandle, _Mapping]] = ...) -> None: ...

class EmbeddingHandle(_message.Message):
    __slots__ = ("key", "instance_id", "transfer_address", "address", "nbytes", "num_tokens", "hidden_size", "num_deepstack", "dtype", "vision_fingerprint", "lease_expires_unix_ms", "control_address", "lease_id", "in_store", "signature")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_DEEPSTACK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VISION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IN_STORE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key: str
    instance_id: str
    transfer_address: str
    address: int
    nbytes: int
    num_tokens: int
    hidden_size: int
    num_deepstack: int
    dtype: str
    vision_fingerprint: str
    lease_expires_unix_ms: int
    control_address: str
    lease_id: str
    in_store: bool
    signature: bytes
    def __init__(self, key: _Optional[str] = ..., instance_id: _Optional[str] = ..., transfer_address: _Optional[str] = ..., address: _Optional[int] = ..., nbytes: _Optional[int] = ..., num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_deepstack: _Optional[int] = ..., dtype: _Optional[str] = ..., vision_fingerprint: _Optional[str] = ..., lease_expires_unix_ms: _Optional[int] = ..., control_address: _Optional[str] = ..., lease_id: _Optional[str] = ..., in_store: _Optional[bool] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "media", "lease_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    lease_ms: int
    def __init__(self, request_id: _Optional[str] = ..., media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("handles", "hits")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedCompositeFieldContainer[EmbeddingHandle]
    hits: int
    def __init__(self, handles: _Optional[_Iterable[_Union[EmbeddingHandle, _Mapping]]] = ..., hits: _Optional[int] = ...) -> None: ...

class EmbeddingReleaseRequest(_message.Message):
    __slots__ = ("lease_ids", "instance_id")
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    instance_id: str
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "media", "sampling", "lease_ms", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    sampling: SamplingParams
    lease_ms: int
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., lease_ms: _Optional[int] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class PromptLogprobs(_message.Message):
    __slots__ = ("num_top", "logprobs", "ranks", "top_ids", "top_logprobs")
    NUM_TOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    num_top: int
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_top: _Optional[int] = ..., logprobs: _Optional[_Iterable[float]] = ..., ranks: _Optional[_Iterable[int]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class LayoutFingerprint(_message.Message):
    __slots__ = ("model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size", "tp_rank", "quantization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int
    tp_rank: int
    quantization: str
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., quantization: _Optional[str] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("instance_id", "transfer_address", "kv_base_ptr", "block_bytes", "region_num_blocks", "block_ids", "num_tokens", "fingerprint", "lease_expires_unix_ms", "control_address", "rank_segments", "signature", "request_id")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_PTR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    REGION_NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RANK_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    transfer_address: str
    kv_base_ptr: int
    block_bytes: int
    region_num_blocks: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    fingerprint: LayoutFingerprint
    lease_expires_unix_ms: int
    control_address: str
    rank_segments: _containers.RepeatedCompositeFieldContainer[KVSegment]
    signature: bytes
    request_id: str
    def __init__(self, instance_id: _Optional[str] = ..., transfer_address: _Optional[str] = ..., kv_base_ptr: _Optional[int] = ..., block_bytes: _Optional[int] = ..., region_num_blocks: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., fingerprint: _Optional[_Union[LayoutFingerprint, _Mapping]] = ..., lease_expires_unix_ms: _Optional[int] = ..., control_address: _Optional[str] = ..., rank_segments: _Optional[_Iterable[_Union[KVSegment, _Mapping]]] = ..., signature: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class KVSegment(_message.Message):
    __slots__ = ("transfer_address", "kv_base_ptr")
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_PTR_FIELD_NUMBER: _ClassVar[int]
    transfer_address: str
    kv_base_ptr: int
    def __init__(self, transfer_address: _Optional[str] = ..., kv_base_ptr: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token", "handle", "mrope_position_delta", "prompt_len", "num_cached_tokens", "finish_reason", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITION_DELTA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: SampledToken
    handle: KVHandle
    mrope_position_delta: int
    prompt_len: int
    num_cached_tokens: int
    finish_reason: str
    prompt_logprobs: PromptLogprobs
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[_Union[SampledToken, _Mapping]] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ..., mrope_position_delta: _Optional[int] = ..., prompt_len: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "handle", "first_token", "prompt_token_ids", "prompt_len", "mrope_position_delta", "sampling", "num_output_tokens", "layerwise")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITION_DELTA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERWISE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle: KVHandle
    first_token: SampledToken
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_len: int
    mrope_position_delta: int
    sampling: SamplingParams
    num_output_tokens: int
    layerwise: bool
    def __init__(self, request_id: _Optional[str] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ..., first_token: _Optional[_Union[SampledToken, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prompt_len: _Optional[int] = ..., mrope_position_delta: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., num_output_tokens: _Optional[int] = ..., layerwise: _Optional[bool] = ...) -> None: ...

class PrefillStreamEvent(_message.Message):
    __slots__ = ("announce", "result")
    ANNOUNCE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    announce: KVHandle
    result: PrefillResponse
    def __init__(self, announce: _Optional[_Union[KVHandle, _Mapping]] = ..., result: _Optional[_Union[PrefillResponse, _Mapping]] = ...) -> None: ...

class WatchKVRequest(_message.Message):
    __slots__ = ("request_id", "instance_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class KVProgress(_message.Message):
    __slots__ = ("tokens_ready", "chunk_tokens", "layers_ready", "result")
    TOKENS_READY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_READY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    tokens_ready: int
    chunk_tokens: int
    layers_ready: int
    result: PrefillResponse
    def __init__(self, tokens_ready: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., layers_ready: _Optional[int] = ..., result: _Optional[_Union[PrefillResponse, _Mapping]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token", "finish_reason", "num_prompt_tokens", "num_output_tokens", "error", "num_cached_tokens", "prompt_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: SampledToken
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    error: str
    num_cached_tokens: int
    prompt_logprobs: PromptLogprobs
    def __init__(self, token: _Optional[_Union[SampledToken, _Mapping]] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., error: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "instance_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("role", "instance_id", "running", "waiting", "blocks_used", "blocks_total", "kv_transfers_total", "kv_transfer_bytes_total", "kv_transfer_seconds_total", "prefix_cache_queries", "prefix_cache_hits", "requests_total", "embedding_hits", "embedding_store_hits", "embedding_misses", "encode_seconds_total", "embedding_bytes_used", "embedding_bytes_total", "embedding_leases", "embedding_reads", "embedding_read_bytes", "embedding_read_failures")
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROLE_UNSPECIFIED: _ClassVar[LoadReport.Role]
        PREFILL: _ClassVar[LoadReport.Role]
        DECODE: _ClassVar[LoadReport.Role]
        ENCODE: _ClassVar[LoadReport.Role]
    ROLE_UNSPECIFIED: LoadReport.Role
    PREFILL: LoadReport.Role
    DECODE: LoadReport.Role
    ENCODE: LoadReport.Role
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_HITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_STORE_HITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MISSES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LEASES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_READS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_READ_FAILURES_FIELD_NUMBER: _ClassVar[int]
    role: LoadReport.Role
    instance_id: str
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    kv_transfers_total: int
    kv_transfer_bytes_total: int
    kv_transfer_seconds_total: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    requests_total: int
    embedding_hits: int
    embedding_store_hits: int
    embedding_misses: int
    encode_seconds_total: float
    embedding_bytes_used: int
    embedding_bytes_total: int
    embedding_leases: int
    embedding_reads: int
    embedding_read_bytes: int
    embedding_read_failures: int
    def __init__(self, role: _Optional[_Union[LoadReport.Role, str]] = ..., instance_id: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., blocks_used: _Optional[int] = ..., blocks_total: _Optional[int] = ..., kv_transfers_total: _Optional[int] = ..., kv_transfer_bytes_total: _Optional[int] = ..., kv_transfer_seconds_total: _Optional[float] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., requests_total: _Optional[int] = ..., embedding_hits: _Optional[int] = ..., embedding_store_hits: _Optional[int] = ..., embedding_misses: _Optional[int] = ..., encode_seconds_total: _Optional[float] = ..., embedding_bytes_used: _Optional[int] = ..., embedding_bytes_total: _Optional[int] = ..., embedding_leases: _Optional[int] = ..., embedding_reads: _Optional[int] = ..., embedding_read_bytes: _Optional[int] = ..., embedding_read_failures: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("served_model_name", "family", "tokenizer_json", "tokenizer_config_json", "chat_template", "preprocessor_config_json", "video_preprocessor_config_json", "generation_config_json", "max_model_len", "eos_token_ids", "vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    SERVED_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSOR_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VIDEO_PREPROCESSOR_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VISION_START_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    VISION_END_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    served_model_name: str
    family: str
    tokenizer_json: bytes
    tokenizer_config_json: bytes
    chat_template: str
    preprocessor_config_json: str
    video_preprocessor_config_json: str
    generation_config_json: str
    max_model_len: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int
    def __init__(self, served_model_name: _Optional[str] = ..., family: _Optional[str] = ..., tokenizer_json: _Optional[bytes] = ..., tokenizer_config_json: _Optional[bytes] = ..., chat_template: _Optional[str] = ..., preprocessor_config_json: _Optional[str] = ..., video_preprocessor_config_json: _Optional[str] = ..., generation_config_json: _Optional[str] = ..., max_model_len: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., vision_start_token_id: _Optional[int] = ..., vision_end_token_id: _Optional[int] = ..., image_token_id: _Optional[int] = ..., video_token_id: _Optional[int] = ...) -> None: ...
