"""Vision embeddings by content hash, bounded in bytes: a repeated image skips the tower."""
from collections import OrderedDict

import torch

from qwenvl_pd.model.inputs import MMItem
from qwenvl_pd.model.vision import VisionEmbeds


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, VisionEmbeds] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def encode(self, model, items: list[MMItem]) -> VisionEmbeds:
        """Embeddings of all items, rows in prompt order; missing items go through one forward."""
        missing = list({it.content_hash: it for it in items if it.content_hash not in self._entries}.values())
        self.misses += len(missing)
        self.hits += len(items) - len(missing)
        fresh = self._run(model, missing) if missing else {}
        parts = [fresh.get(it.content_hash) or self._touch(it.content_hash) for it in items]
        for h, e in fresh.items():
            self._put(h, e)
        return _concat(parts)

    def _run(self, model, items: list[MMItem]) -> dict[str, VisionEmbeds]:
        pixels = torch.cat([it.pixel_values for it in items])
        grid = torch.tensor([it.grid_thw for it in items])
        out = model.encode_vision(pixels, grid).split([it.num_tokens for it in items])
        return {it.content_hash: e for it, e in zip(items, out)}

    def _touch(self, key: str) -> VisionEmbeds:
        self._entries.move_to_end(key)
        return self._entries[key]

    def _put(self, key: str, value: VisionEmbeds) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= _nbytes(old)


def _nbytes(e: VisionEmbeds) -> int:
    deep = 0 if e.deepstack is None else e.deepstack.numel() * e.deepstack.element_size()
    return e.embeds.numel() * e.embeds.element_size() + deep


def _concat(parts: list[VisionEmbeds]) -> VisionEmbeds:
    embeds = torch.cat([p.embeds for p in parts])
    if parts[0].deepstack is None:
        return VisionEmbeds(embeds)
    return VisionEmbeds(embeds, torch.cat([p.deepstack for p in parts], dim=1))
