"""The proxy's settings, built once at the CLI and read everywhere else."""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl_pd.proxy.prompt.media import MediaLimits


def parse_addresses(spec: str | None) -> tuple[str, ...]:
    """``host:port[,host:port]`` -> a tuple; raises ValueError naming a bad entry."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"instance address {item!r} is not HOST:PORT")
        out.append(item)
    return tuple(dict.fromkeys(out))  # a repeated address is one instance


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    prefill: tuple[str, ...] = ()  # static instances, "host:port" of their gRPC servers
    decode: tuple[str, ...] = ()
    encode: tuple[str, ...] = ()  # optional encoders (EPD); none: prefill runs the vision tower
    discover_dns: str = ""  # "prefill=NAME:PORT,decode=NAME:PORT[,encode=NAME:PORT]" (cluster/discovery.py)
    api_keys: tuple[str, ...] = ()  # none: no authentication
    cache_salt_per_api_key: bool = False  # each key's requests share prefix-cache hits only among them
    cluster_secret: bytes = field(default=b"", repr=False)  # sent on every node RPC
    served_model_name: str = ""  # "" : the name prefill reports
    allowed_local_media_path: str = ""
    allow_private_media: bool = False
    max_concurrent_requests: int = 256  # beyond this, 429 at once: no unbounded queue
    max_images_per_request: int = 16  # the nodes' default --limit-images
    max_videos_per_request: int = 2
    max_media_bytes: int = 20 << 20
    max_request_media_bytes: int = 256 << 20  # a request's media bytes x n: what n samples would carry
    media_timeout_s: float = 10.0
    max_image_pixels: int = 8192 * 8192  # declared in the header; decompression-bomb guard
    max_video_frames: int = 100_000  # in the source video, declared or counted; checked before decoding
    max_body_bytes: int = 64 << 20  # base64 images make bodies large, but not unbounded
    health_interval_s: float = 2.0
    load_interval_s: float = 1.0
    discovery_interval_s: float = 5.0
    prefill_load_cap: int = 8  # affinity holds while its prefill has fewer requests than this
    affinity_tokens: int = 16  # prompt tokens in the affinity key (one KV block by default)
    model_info_timeout_s: float = 300.0  # how long start-up waits for a prefill to answer
    prefill_timeout_s: float = 600.0
    token_timeout_s: float = 60.0  # a running request without a token this long: decode is stuck
    encode_timeout_s: float = 30.0  # bounds an encode round, its one retry included; then the bytes
    kv_transfer_mode: str = "whole"  # "layerwise": decode reads the KV while prefill computes
    colocated_model: str = ""  # serve --colocated: one in-process engine instead of PD nodes
    cpus: tuple[int, ...] = ()  # cores the proxy (and a colocated engine) is pinned to; (): not pinned

    def __post_init__(self):
        if not (self.prefill or self.decode or self.discover_dns or self.colocated_model):
            raise ValueError("the proxy needs --prefill and --decode addresses or --discover-dns")
        if not self.colocated_model and not self.discover_dns and not (self.prefill and self.decode):
            raise ValueError("give at least one --prefill and one --decode address (or --discover-dns)")
        if self.max_concurrent_requests < 1 or self.prefill_load_cap < 1:
            raise ValueError("--max-concurrent-requests and --prefill-load-cap must be >= 1")
        if self.kv_transfer_mode not in ("whole", "layerwise"):
            raise ValueError(f"--kv-transfer-mode must be whole or layerwise, not {self.kv_transfer_mode!r}")
        if not (self.prefill_timeout_s > 0 and self.token_timeout_s > 0 and self.encode_timeout_s > 0):
            raise ValueError("--prefill-timeout, --token-timeout and --encode-timeout must be > 0")

    @property
    def media_limits(self) -> MediaLimits:
        return MediaLimits(max_bytes=self.max_media_bytes, timeout_s=self.media_timeout_s,
                           allow_private=self.allow_private_media,
                           allowed_local_media_path=self.allowed_local_media_path or None,
                           max_image_pixels=self.max_image_pixels, max_video_frames=self.max_video_frames)
