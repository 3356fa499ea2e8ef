"""Layer-wise KV progress of the sequences whose KV streams to decode while they prefill.

The text model calls `on_layer(i)` after layer i of an eager forward (TextModel.on_layer); the
engine sets that hook only for steps that carry a streaming sequence, so every other step pays
one `is None` test per layer. A report is cumulative, so a reader that missed some only needs
the latest: tokens [0, tokens_ready) are final in every layer, and tokens [0, chunk_tokens)
(the chunk being computed) are final in layers [0, layers_ready).

Prefill nodes allocate a sequence's blocks for its whole prompt at admission and never grow or
preempt it (finish_after_prefill), so the block ids announced before the first chunk hold for
all of it. On CPU a layer's K/V writes are done when the hook runs; on an accelerator the hook
synchronizes the device first (a sync per reported group, not an event per layer: simple, and
only on steps that stream). With tensor parallelism the hook runs on rank 0, and every other
rank has written its heads of layer i by then: layer i's row-parallel all-reduce, which rank 0
has just finished, comes after each rank's K/V write of that layer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence


@dataclass(frozen=True)
class LayerProgress:
    request_id: str
    tokens_ready: int   # prompt tokens final in every layer
    chunk_tokens: int   # tokens [0, chunk_tokens) are final in layers [0, layers_ready)
    layers_ready: int
    block_ids: tuple[int, ...] = ()  # set on a sequence's first report only: the announce


Report = Callable[[LayerProgress], None]


class KVStreams:
    """Which sequences stream, and their progress through each step (engine thread only)."""

    def __init__(self, text_model, num_layers: int, group: int, report: Report,
                 device: torch.device = torch.device("cpu")):
        if group < 1:
            raise ValueError(f"a layer group must be at least 1 layer, got {group}")
        self.text, self.num_layers, self.group, self.report = text_model, num_layers, group, report
        self.watched: set[str] = set()
        self._announced: set[str] = set()
        self._step: list[tuple[str, int, int]] = []  # (request id, chunk start, chunk end)
        self._sync = _synchronize(device)

    def watch(self, request_id: str) -> None:
        self.watched.add(request_id)

    def unwatch(self, request_id: str) -> None:
        self.watched.discard(request_id)
        self._announced.discard(request_id)

    def begin(self, chunks: list[ScheduledChunk]) -> None:
        """Before the forward: announce newly admitted streaming sequences, arm the hook."""
        self._step = [(c.seq.request_id, c.seq.num_computed, c.seq.num_computed + c.num_tokens)
                      for c in chunks if c.seq.request_id in self.watched]
        for c in chunks:
            if c.seq.request_id in self.watched and c.seq.request_id not in self._announced:
                self._announce(c.seq)
        self.text.on_layer = self._on_layer if self._step else None

    def _announce(self, seq: Sequence) -> None:
        self._announced.add(seq.request_id)
        # a prefix-cache hit is final in every layer before anything runs
        self.report(LayerProgress(seq.request_id, seq.num_computed, seq.num_computed, self.num_layers,
                                  tuple(seq.block_ids)))

    def _on_layer(self, i: int) -> None:
        done = i + 1
        if done % self.group or done == self.num_layers:
            return  # the last group is reported by end(), with the step's tokens
        self._sync()
        for rid, start, end in self._step:
            self.report(LayerProgress(rid, start, end, done))

    def end(self) -> None:
        """After the forward: each streamed chunk is final in every layer."""
        self.text.on_layer = None
        for rid, _, end in self._step:
            self.report(LayerProgress(rid, end, end, self.num_layers))
        self._step = []


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "npu":
        return torch.npu.synchronize  # torch_npu registers the module
    return lambda: None
