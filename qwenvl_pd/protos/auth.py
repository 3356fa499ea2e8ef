"""The roles' shared cluster secret: every node RPC carries it, and prefill signs the KV handles
it issues so that decode reads KV only from handles a prefill of this cluster wrote (encoders
sign their embedding handles the same way).

Without a secret (the default of the stand-alone roles) nothing is checked; `serve` makes one
per run, the chart takes one from a Kubernetes Secret. The gRPC health service stays open:
kubelet's gRPC probes cannot send metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from pathlib import Path
from typing import TypeVar

import grpc

from qwenvl_pd.protos import convert

METADATA_KEY = "x-qwenvl-pd-secret"
ENV = "QWENVL_PD_CLUSTER_SECRET"
OPEN_PREFIX = "/grpc.health.v1.Health/"


def read_secret(path: str = "") -> bytes:
    """The secret from `path` (a mounted Secret) or else $QWENVL_PD_CLUSTER_SECRET; b"" for none.

    Surrounding whitespace is dropped (`kubectl create secret --from-file` keeps the file's newline);
    a secret that is given but empty once stripped ends the process with a message, not a traceback.
    """
    if path:
        return _non_empty(Path(path).read_bytes(), path)
    raw = os.environb.get(ENV.encode())
    return b"" if raw is None else _non_empty(raw, f"${ENV}")


def _non_empty(raw: bytes, source: str) -> bytes:
    secret = raw.strip()
    if not secret:
        raise SystemExit(f"the cluster secret from {source} is empty: give a non-empty value or none at all")
    return secret


def token(secret: bytes) -> str:
    """What travels in the metadata: printable whatever bytes the secret holds (gRPC refuses
    non-ASCII header values), and not the secret itself, which also keys the handle MACs."""
    return hashlib.sha256(b"qwenvl-pd cluster auth\0" + secret).hexdigest()


Handle = TypeVar("Handle")  # a dataclass of convert.PAIRS with a `signature` field (KV, embedding)


def sign(handle: Handle, secret: bytes) -> Handle:
    return dataclasses.replace(handle, signature=_mac(handle, secret))


def is_signed(handle, secret: bytes) -> bool:
    return hmac.compare_digest(_mac(handle, secret), handle.signature)


def _mac(handle, secret: bytes) -> bytes:
    """HMAC-SHA256 over the handle's wire form without its signature."""
    unsigned = convert.to_proto(dataclasses.replace(handle, signature=b""))
    return hmac.new(secret, unsigned.SerializeToString(deterministic=True), hashlib.sha256).digest()


class ServerAuth(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every RPC but health checks that lacks the secret."""

    def __init__(self, secret: bytes):
        self.expected = token(secret).encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX) or self._carries(details):
            return handler
        return _refusal(handler)

    def _carries(self, details) -> bool:
        sent = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        return isinstance(sent, str) and hmac.compare_digest(sent.encode(), self.expected)


def _refusal(handler):
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "this node requires the cluster secret (--cluster-secret-file or "
                            f"${ENV}) on every call")
    if handler.unary_stream:
        async def refuse_stream(request, context):
            await refuse(request, context)
            yield  # pragma: no cover - abort raised
        return grpc.unary_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                               handler.response_serializer)


class _WithSecret:
    def __init__(self, secret: bytes):
        self.pair = (METADATA_KEY, token(secret))

    def _with_secret(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.pair)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under the first interceptor type it is: one class per call shape
class _UnaryAuth(_WithSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


class _StreamAuth(_WithSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


def channel(address: str, secret: bytes = b"", options=()) -> grpc.aio.Channel:
    """An aio channel to a node; every call on it carries the secret when there is one."""
    interceptors = [_UnaryAuth(secret), _StreamAuth(secret)] if secret else None
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
