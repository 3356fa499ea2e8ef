"""Builds one flat forward from a list of sequences (prefill chunks and decode tokens mixed)."""
import torch

from qwenvl_pd.engine.block_tables import BlockTables
from qwenvl_pd.engine.graphs import DecodeGraphs
from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence
from qwenvl_pd.engine.token_inputs import flat_tokens
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.layers.attention import AttentionMetadata, DecodeGroup, PrefillSpan
from qwenvl_pd.model.text import VisualInjection

# decode rows attend in groups of this many (sorted by context length): one padded batch for
# all rows would read up to max/mean times the keys it needs (4 measured best of 2-8 on CPU)
DECODE_GROUP = 4


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, kv_cache: torch.Tensor, block_size: int,
                 graphs: DecodeGraphs | None = None):
        self.model = model
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.gather_buffer = torch.empty(0, dtype=kv_cache.dtype, device=self.device)
        self.tables = BlockTables()
        cfg = model.config
        self.mm_token_ids = torch.tensor([cfg.image_token_id, cfg.video_token_id])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward the chunks; logits [len(chunks), vocab] at each chunk's last token, in order."""
        if self.graphs is not None and self._graph_ready(chunks):
            return self.model.compute_logits(self._run_graph(chunks))
        # decode rows first, shortest context first, so that each decode group pads little
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].num_tokens > 1,
                                                          len(chunks[i].seq.block_ids)))
        ordered = [chunks[i] for i in order]
        ids, positions, meta, visual = self.prepare(ordered)
        hidden = self.model(ids, positions, self.kv_cache, meta, visual)
        # each chunk's last token, back in the caller's order before the [rows, vocab] lm_head
        ends = torch.tensor([c.num_tokens for c in ordered]).cumsum(0) - 1
        rows = ends[torch.tensor(order).argsort()]
        return self.model.compute_logits(hidden[rows.to(self.device)])

    def _graph_ready(self, chunks: list[ScheduledChunk]) -> bool:
        return (all(c.num_tokens == 1 for c in chunks)
                and self.graphs.fits(len(chunks), max(len(c.seq.block_ids) for c in chunks)))

    def _run_graph(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        seqs = [c.seq for c in chunks]
        ids = torch.tensor([s.token_ids[s.num_computed] for s in seqs], device=self.device)
        positions = torch.cat([s.positions(s.num_computed, s.num_computed + 1) for s in seqs], dim=1)
        slots = torch.tensor([self._slot(s, s.num_computed) for s in seqs], device=self.device)
        lens = torch.tensor([s.num_computed + 1 for s in seqs], device=self.device)
        tables = self._block_tables(seqs).to(self.device)
        return self.graphs.run(ids, positions.to(self.device), slots, tables, lens)

    def prepare(self, chunks: list[ScheduledChunk]):
        """chunks must list single-token chunks first (run() orders them)."""
        embeds, deep = [], []
        ids, pos, slots, mask = flat_tokens(chunks, self.block_size, lambda s, start, end:
                                            self._collect_vision(s, start, end, embeds, deep))
        meta = self._metadata(chunks, slots)
        visual = self._visual(mask, embeds, deep)
        return (torch.tensor(ids, device=self.device), pos.to(self.device), meta, visual)

    def _metadata(self, chunks: list[ScheduledChunk], slots: list[int]) -> AttentionMetadata:
        decode = [c.seq for c in chunks if c.num_tokens == 1]
        # one launch for all rows where launches cost more than padding does (CUDA, NPU)
        size = DECODE_GROUP if self.device.type == "cpu" else max(len(decode), 1)
        # tables, lengths and key masks of all decode rows at once; each group takes a slice
        widths = [len(s.block_ids) for s in decode]
        tables = self._block_tables(decode)
        lens = torch.tensor([s.num_computed + 1 for s in decode], dtype=torch.long)
        masks = (torch.arange(tables.shape[1] * self.block_size)[None] < lens[:, None])[:, None, None]
        groups = [self._decode_group(i * size, max(widths[i * size:(i + 1) * size]), *rows)
                  for i, rows in enumerate(zip(tables.split(size), lens.split(size), masks.split(size)))
                  ] if decode else []  # split() of nothing is one empty piece
        prefills, offset = [], len(decode)
        for c in chunks[len(decode):]:
            end = c.seq.num_computed + c.num_tokens
            prefills.append(PrefillSpan(offset, offset + c.num_tokens, end,
                                        torch.tensor(c.seq.block_ids, device=self.device)))
            offset += c.num_tokens
        # chunks with earlier keys gather them; a first chunk attends over its own K/V
        gathers = [len(p.block_table) for p in prefills if p.context_len > p.end - p.start]
        most = max([g.block_tables.numel() for g in groups] + gathers, default=0)
        return AttentionMetadata(torch.tensor(slots, device=self.device), len(decode), groups,
                                 prefills, self._gather_buffer(most))

    def _gather_buffer(self, blocks: int) -> torch.Tensor:
        """Scratch for `blocks` gathered K/V blocks, grown by half again when short so that it is
        rarely reallocated as sequences lengthen."""
        need = blocks * self.kv_cache[0, :, :1].numel()
        if self.gather_buffer.numel() < need:
            self.gather_buffer = torch.empty(need * 3 // 2, dtype=self.kv_cache.dtype, device=self.device)
        return self.gather_buffer

    def _decode_group(self, start: int, width: int, tables: torch.Tensor, lens: torch.Tensor,
                      masks: torch.Tensor) -> DecodeGroup:
        """One group's rows, cut to the group's widest table: [rows, blocks], [rows],
        masks [rows, 1, 1, ctx]."""
        fused_lens = lens.to(torch.int32) if self.device.type == "npu" else None
        return DecodeGroup(start, start + len(lens), tables[:, :width].to(self.device),
                           masks[..., :width * self.block_size].to(self.device), fused_lens)

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
        return VisualInjection(mask.to(self.device), torch.cat(embeds).to(self.device),
                               torch.cat(deep, dim=1).to(self.device) if deep else None)
