"""What the HTTP wing needs of whatever serves the tokens: the PD cluster (PDBackend) or the one
colocated engine of `serve --colocated` (node/colocated.py). Both are opened by an OpenBackend the
app calls once at start-up."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from qwenvl_pd.messages import ModelInfo, PrefillRequest, TokenEvent
from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.metrics import ProxyMetrics


class Backend(Protocol):
    def ready(self) -> bool:
        """True once it can take a request (every role has a healthy instance)."""

    def generate(self, req: PrefillRequest, key: bytes) -> AsyncIterator[TokenEvent]:
        """One sample of req: the first token's event (with num_cached_tokens and prompt_logprobs),
        then one event a token up to and including the one with a finish_reason. key is the
        request's affinity key (router.affinity_key). Closing the iterator early cancels the
        request and frees its blocks; failures raise errors.APIError."""


# (config, metrics) -> (backend, the model's info, close()); called once by the app's lifespan
OpenBackend = Callable[[ProxyConfig, ProxyMetrics], Awaitable[tuple[Backend, ModelInfo, Callable]]]
