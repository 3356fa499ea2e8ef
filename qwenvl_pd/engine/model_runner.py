"""Builds one flat forward from a list of sequences (prefill chunks and decode tokens mixed)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from qwenvl_pd.engine.block_tables import BlockTables
from qwenvl_pd.engine.graphs import DecodeGraphs
from qwenvl_pd.engine.prompt_logprobs import PromptCollector, num_rows
from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence
from qwenvl_pd.engine.step_input import DecodeRows, StepInput
from qwenvl_pd.engine.token_inputs import flat_tokens
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.layers import cpu_paged
from qwenvl_pd.model.layers.attention import AttentionMetadata, DecodeGroup, PrefillSpan
from qwenvl_pd.model.text import VisualInjection

if TYPE_CHECKING:
    from qwenvl_pd.engine.ranks import StepChannel

# decode rows attend in groups of this many (sorted by context length): one padded batch for
# all rows would read up to max/mean times the keys it needs (4 measured best of 2-8 on CPU);
# the CPU kernel reads each row's own keys, so it takes all rows at once
DECODE_GROUP = 4
# prompt-logprob rows per lm_head call: [256, 152k] float32 logits are 155 MB, whatever the chunk
PROMPT_SLICE = 256


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, kv_cache: torch.Tensor, block_size: int,
                 graphs: DecodeGraphs | None = None, channel: StepChannel | None = None):
        self.model = model
        self.graphs, self.channel = graphs, channel
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.gather_buffer = torch.empty(0, dtype=kv_cache.dtype, device=self.device)
        self.tables = BlockTables()
        cfg = model.config
        self.mm_token_ids = torch.tensor([cfg.image_token_id, cfg.video_token_id])
        self._in_place()  # builds (or loads) the CPU kernel now, not in the first request's step

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward the chunks; logits [len(chunks), vocab] at each chunk's last token, in order.
        Sequences that asked for prompt logprobs get this chunk's rows appended.
        With tensor parallelism every other rank runs the same step from the broadcast."""
        step = self.prepare(chunks)
        if self.channel is not None:
            self.channel.send(step)
        collector = PromptCollector(chunks) if len(step.prompt_rows) else None
        logits = self.execute(step, collector)
        if collector is not None:
            collector.finish()
        return logits

    @torch.inference_mode()
    def execute(self, step: StepInput,
                on_prompt_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """One forward on this rank -> logits [len(step.logit_rows), vocab]. The prompt rows'
        logits go to on_prompt_logits in slices (rank 0; the other ranks only join the gathers)."""
        if step.graph:
            rows, dev = step.decode[0], self.device
            hidden = self.graphs.run(step.input_ids.to(dev), step.positions.to(dev),
                                     step.slot_mapping.to(dev), rows.block_tables.to(dev),
                                     rows.lens.to(dev))
            return self.model.compute_logits(hidden)
        hidden = self.model(*self.inputs(step))
        logits = self.model.compute_logits(hidden[step.logit_rows.to(self.device)])
        prompt_rows = step.prompt_rows.to(self.device)
        for i in range(0, len(prompt_rows), PROMPT_SLICE):
            part = self.model.compute_logits(hidden[prompt_rows[i:i + PROMPT_SLICE]])
            if on_prompt_logits is not None:
                on_prompt_logits(part)
        return logits

    def inputs(self, step: StepInput):
        """The model's arguments for an eager step: ids, positions, cache, metadata, visual."""
        visual, dev = step.visual, self.device
        if visual is not None:
            visual = VisualInjection(visual.mask.to(dev), visual.embeds.to(dev),
                                     None if visual.deepstack is None else visual.deepstack.to(dev))
        return (step.input_ids.to(dev), step.positions.to(dev), self.kv_cache,
                self._metadata(step), visual)

    def prepare(self, chunks: list[ScheduledChunk]) -> StepInput:
        """Host-side inputs of the step, the same on every rank."""
        if self.graphs is not None and self._graph_ready(chunks):
            return self._graph_step(chunks)
        # decode rows first, shortest context first, so that each decode group pads little
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].num_tokens > 1,
                                                          len(chunks[i].seq.block_ids)))
        ordered = [chunks[i] for i in order]
        embeds, deep = [], []
        ids, pos, slots, mask = flat_tokens(ordered, self.block_size, lambda s, start, end:
                                            self._collect_vision(s, start, end, embeds, deep))
        # each chunk's last token, back in the caller's order before the [rows, vocab] lm_head
        ends = torch.tensor([c.num_tokens for c in ordered]).cumsum(0) - 1
        back = torch.tensor(order).argsort()
        step = StepInput(torch.tensor(ids), pos, torch.tensor(slots), ends[back],
                         visual=self._visual(mask, embeds, deep),
                         prompt_rows=self._prompt_rows(chunks, ends[back]))
        self._attention_rows(ordered, step)
        return step

    @staticmethod
    def _prompt_rows(chunks: list[ScheduledChunk], ends: torch.Tensor) -> torch.Tensor:
        """Flat rows [P] whose logits score prompt tokens, in the caller's chunk order (each
        chunk's first num_rows tokens: its positions num_computed on)."""
        rows = [torch.arange(n) + (int(end) - c.num_tokens + 1)
                for c, end in zip(chunks, ends) if (n := num_rows(c))]
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def _graph_ready(self, chunks: list[ScheduledChunk]) -> bool:
        return (all(c.num_tokens == 1 for c in chunks)
                and self.graphs.fits(len(chunks), max(len(c.seq.block_ids) for c in chunks)))

    def _graph_step(self, chunks: list[ScheduledChunk]) -> StepInput:
        seqs = [c.seq for c in chunks]
        ids = torch.tensor([s.token_ids[s.num_computed] for s in seqs])
        positions = torch.cat([s.positions(s.num_computed, s.num_computed + 1) for s in seqs], dim=1)
        slots = torch.tensor([self._slot(s, s.num_computed) for s in seqs])
        lens = torch.tensor([s.num_computed + 1 for s in seqs])
        rows = DecodeRows(0, self._block_tables(seqs), lens)
        return StepInput(ids, positions, slots, torch.arange(len(seqs)), [rows], graph=True)

    def _attention_rows(self, chunks: list[ScheduledChunk], step: StepInput) -> None:
        decode = [c.seq for c in chunks if c.num_tokens == 1]
        # one launch for all rows where launches cost more than padding does (CUDA, NPU, the
        # CPU kernel); the CPU reference pads each group to its longest row
        padded = self.device.type == "cpu" and not self._in_place()
        size = DECODE_GROUP if padded else max(len(decode), 1)
        if decode:  # one table for all decode rows (rows persist between steps); groups slice it
            widths = [len(seq.block_ids) for seq in decode]
            tables = self._block_tables(decode)
            lens = torch.tensor([seq.num_computed + 1 for seq in decode])
            for i in range(0, len(decode), size):
                step.decode.append(DecodeRows(i, tables[i:i + size, :max(widths[i:i + size])],
                                              lens[i:i + size]))
        offset = len(decode)
        for c in chunks[len(decode):]:
            end = c.seq.num_computed + c.num_tokens
            step.prefills.append(PrefillSpan(offset, offset + c.num_tokens, end,
                                              torch.tensor(c.seq.block_ids)))
            offset += c.num_tokens

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        groups, dev = self._decode_groups(step), self.device
        prefills = [PrefillSpan(p.start, p.end, p.context_len, p.block_table.to(dev))
                    for p in step.prefills]
        # chunks with earlier keys gather them; a first chunk attends over its own K/V
        gathers = [len(p.block_table) for p in prefills if p.context_len > p.end - p.start]
        if not self._in_place():  # the kernel reads decode rows' blocks where they are
            gathers += [g.block_tables.numel() for g in groups]
        most = max(gathers, default=0)
        num_decode = sum(len(rows.lens) for rows in step.decode)
        return AttentionMetadata(step.slot_mapping.to(dev), num_decode, groups, prefills,
                                 self._gather_buffer(most))

    def _in_place(self) -> bool:
        """Whether CPU decode attention runs cpu_paged's kernel (else the torch reference)."""
        return (self.device.type == "cpu" and self.kv_cache.dtype in cpu_paged.DTYPES
                and cpu_paged.available())

    def _gather_buffer(self, blocks: int) -> torch.Tensor:
        """Scratch for `blocks` gathered K/V blocks, grown by half again when short so that it is
        rarely reallocated as sequences lengthen."""
        need = blocks * self.kv_cache[0, :, :1].numel()
        if self.gather_buffer.numel() < need:
            self.gather_buffer = torch.empty(need * 3 // 2, dtype=self.kv_cache.dtype, device=self.device)
        return self.gather_buffer

    def _decode_groups(self, step: StepInput) -> list[DecodeGroup]:
        if not step.decode:
            return []
        # key masks [rows, 1, 1, ctx] of all rows at once; each group takes its rows and width
        lens = torch.cat([rows.lens for rows in step.decode])
        widest = max(rows.block_tables.shape[1] for rows in step.decode)
        masks = (torch.arange(widest * self.block_size)[None] < lens[:, None])[:, None, None]
        return [self._decode_group(rows, masks[rows.start:rows.start + len(rows.lens)])
                for rows in step.decode]

    def _decode_group(self, rows: DecodeRows, masks: torch.Tensor) -> DecodeGroup:
        tables, lens = rows.block_tables, rows.lens
        fused_lens = lens.to(torch.int32) if self.device.type == "npu" else None
        return DecodeGroup(rows.start, rows.start + len(lens), tables.to(self.device),
                           masks[..., :tables.shape[1] * self.block_size].to(self.device), fused_lens,
                           lens.to(self.device))

    def _slot(self, seq: Sequence, index: int) -> int:
        return seq.block_ids[index // self.block_size] * self.block_size + index % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        return self.tables.gather(seqs)

    def _collect_vision(self, seq: Sequence, start: int, end: int, embeds: list,
                        deep: list) -> torch.Tensor:
        """The chunk's placeholder mask [end-start]; appends the embedding rows it takes."""
        if seq.vision is None or start >= seq.prompt_len:
            return torch.zeros(end - start, dtype=torch.bool)
        # the i-th placeholder of the prompt takes the i-th embedding row; generated tokens never do
        is_mm = torch.isin(torch.tensor(seq.token_ids[:min(end, seq.prompt_len)]), self.mm_token_ids)
        first, last = int(is_mm[:start].sum()), int(is_mm.sum())
        embeds.append(seq.vision.embeds[first:last])
        if seq.vision.deepstack is not None:
            deep.append(seq.vision.deepstack[:, first:last])
        pad = torch.zeros(end - len(is_mm), dtype=torch.bool)
        return torch.cat([is_mm[start:], pad])

    def _visual(self, mask, embeds, deep) -> VisualInjection | None:
        if not embeds:
            return None
        return VisualInjection(mask, torch.cat(embeds), torch.cat(deep, dim=1) if deep else None)
