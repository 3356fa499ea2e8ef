"""Builds one flat forward from a list of sequences (prefill chunks and decode tokens mixed)."""
from dataclasses import dataclass

import torch

from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.layers.attention import AttentionMetadata
from qwenvl_pd.model.text import VisualInjection


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq to compute this step, from seq.num_computed on


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, kv_cache: torch.Tensor, block_size: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        cfg = model.config
        self.mm_token_ids = torch.tensor([cfg.image_token_id, cfg.video_token_id])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward the chunks; logits [len(chunks), vocab] at each chunk's last token."""
        ids, positions, meta, visual = self.prepare(chunks)
        hidden = self.model(ids, positions, self.kv_cache, meta, visual)
        last = meta.query_start_loc[1:] - 1
        return self.model.compute_logits(hidden[last])

    def prepare(self, chunks: list[ScheduledChunk]):
        ids, pos, slots, q_lens, seq_lens = [], [], [], [], []
        masks, embeds, deep = [], [], []
        for c in chunks:
            s, start = c.seq, c.seq.num_computed
            end = start + c.num_tokens
            ids.extend(s.token_ids[start:end])
            pos.append(s.positions(start, end))
            slots.extend(self._slot(s, i) for i in range(start, end))
            q_lens.append(c.num_tokens)
            seq_lens.append(end)
            masks.append(self._collect_vision(s, start, end, embeds, deep))
        input_ids = torch.tensor(ids, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=self.device),
            seq_lens=torch.tensor(seq_lens, device=self.device),
            block_tables=self._block_tables([c.seq for c in chunks]),
            max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_lens_host=tuple(q_lens))
        visual = self._visual(torch.cat(masks), embeds, deep)
        return input_ids, torch.cat(pos, dim=1).to(self.device), meta, visual

    def _slot(self, seq: Sequence, index: int) -> int:
        return seq.block_ids[index // self.block_size] * self.block_size + index % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_ids) for s in seqs)
        rows = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

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
        return VisualInjection(mask.to(self.device), torch.cat(embeds).to(self.device),
                               torch.cat(deep, dim=1).to(self.device) if deep else None)
