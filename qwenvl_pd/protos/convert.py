"""Dataclasses of qwenvl_pd.messages (and SamplingParams) <-> the generated proto messages.

Fields map by name. Proto enums map to lower-case strings ("image", "prefill"); GridTHW and
TopLogprob map to plain tuples; an unset `optional` scalar is None; an unset message field
takes the dataclass default, or raises ValueError when the dataclass has none.
SamplingParams.stop is not sent: the proxy applies stop strings itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment, LayoutFingerprint
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.messages import (DecodeRequest, EmbeddingRelease, EncodeRequest, EncodeResult,
                                KVProgress, LoadReport, MediaItem, ModelInfo,
                                PrefillRequest, PrefillResult, PrefillStreamEvent, PromptLogprobs,
                                SampledToken, TokenEvent)
from qwenvl_pd.protos import qwenvl_pd_pb2 as pb
from qwenvl_pd.sampling_params import SamplingParams, StructuredOutputsParams

# dataclass -> proto message class
PAIRS: dict[type, type] = {
    SamplingParams: pb.SamplingParams, StructuredOutputsParams: pb.StructuredOutputsParams,
    MediaItem: pb.MediaItem, PrefillRequest: pb.PrefillRequest,
    SampledToken: pb.SampledToken, LayoutFingerprint: pb.LayoutFingerprint, KVHandle: pb.KVHandle,
    KVSegment: pb.KVSegment, PromptLogprobs: pb.PromptLogprobs,
    PrefillResult: pb.PrefillResponse, DecodeRequest: pb.DecodeRequest, TokenEvent: pb.TokenEvent,
    LoadReport: pb.LoadReport, ModelInfo: pb.ModelInfo,
    PrefillStreamEvent: pb.PrefillStreamEvent, KVProgress: pb.KVProgress,
    EmbeddingHandle: pb.EmbeddingHandle, EncodeRequest: pb.EncodeRequest,
    EncodeResult: pb.EncodeResponse, EmbeddingRelease: pb.EmbeddingReleaseRequest,
}
_BACK = {msg: cls for cls, msg in PAIRS.items()}
# dataclass fields that never go on the wire: the proxy applies stop strings and decodes text
SKIPPED = {SamplingParams: {"stop", "spaces_between_special_tokens"}}
_TUPLE_MESSAGES = (pb.GridTHW, pb.TopLogprob)  # carried as plain tuples of their fields


def to_proto(obj: Any):
    """A dataclass from PAIRS -> its proto message."""
    msg_cls = PAIRS[type(obj)]
    fields = msg_cls.DESCRIPTOR.fields_by_name
    kwargs = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in SKIPPED.get(type(obj), ()) or value is None:
            continue
        fd = fields[f.name]
        if _is_map(fd):
            kwargs[f.name] = dict(value)
            continue
        kwargs[f.name] = [_to_value(fd, v) for v in value] if fd.is_repeated else _to_value(fd, value)
    return msg_cls(**kwargs)


def from_proto(msg) -> Any:
    """A proto message from PAIRS -> its dataclass (validated by the dataclass itself)."""
    cls = _BACK[type(msg)]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED.get(cls, ()):
            continue
        fd = msg.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(msg, f.name)
        if _is_map(fd):  # an empty map is the dataclass's None
            kwargs[f.name] = dict(value) or None
        elif fd.is_repeated:
            kwargs[f.name] = [_from_value(fd, v) for v in value]
        elif fd.has_presence and not msg.HasField(f.name):
            if fd.message_type is None:
                kwargs[f.name] = None
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{msg.DESCRIPTOR.name}.{f.name} is required")
        else:
            kwargs[f.name] = _from_value(fd, value)
    return cls(**kwargs)


def _to_value(fd, value):
    if fd.enum_type is not None:
        number = fd.enum_type.values_by_name.get(value.upper())
        if number is None or number.number == 0:
            raise ValueError(f"{fd.full_name}: unknown value {value!r}")
        return number.number
    if fd.message_type is None:
        return value
    msg_cls = getattr(pb, fd.message_type.name)
    if msg_cls in _TUPLE_MESSAGES:
        return msg_cls(**dict(zip(_names(fd), value, strict=True)))
    return to_proto(value)


def _from_value(fd, value):
    if fd.enum_type is not None:
        known = fd.enum_type.values_by_number.get(value)
        if known is None:
            raise ValueError(f"{fd.full_name}: unknown value {value}")
        return known.name.lower()
    if fd.message_type is None:
        return value
    if type(value) in _TUPLE_MESSAGES:
        return tuple(getattr(value, name) for name in _names(fd))
    return from_proto(value)


def _is_map(fd) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _names(fd) -> list[str]:
    return [f.name for f in fd.message_type.fields]  # declaration order
