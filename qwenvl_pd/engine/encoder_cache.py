"""Vision embeddings by content hash, bounded in bytes: a repeated image skips the tower, and
embeddings an encoder made (carried by the item) are used and kept as they are."""
import threading
from collections import OrderedDict

import torch

from qwenvl_pd.model.inputs import MMItem
from qwenvl_pd.model.vision import VisionEmbeds


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, VisionEmbeds] = OrderedDict()
        self._bytes = 0
        # the engine thread fills it; a node's embedding reader looks keys up from its own threads
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encode(self, model, items: list[MMItem]) -> VisionEmbeds:
        """Embeddings of all items, rows in prompt order; items with neither carried embeddings
        nor an entry here go through one forward."""
        carried = {it.content_hash: _placed(model, it.embeds) for it in items if it.embeds is not None}
        with self._lock:
            known = set(self._entries) | set(carried)
        missing = list({it.content_hash: it for it in items if it.content_hash not in known}.values())
        self.misses += len(missing)
        self.hits += len(items) - len(missing) - len(carried)
        fresh = {**carried, **(self._run(model, missing) if missing else {})}
        with self._lock:
            parts = [fresh.get(it.content_hash) or self._touch(it.content_hash) for it in items]
            for h, e in fresh.items():
                self._put(h, e)
        return _concat(parts)

    def get(self, key: str) -> VisionEmbeds | None:
        """The entry under key (an embedding key or a pixel hash), if this cache holds it."""
        with self._lock:
            return self._touch(key) if key in self._entries else None

    @torch.no_grad()  # cached outputs must hold no autograd graph (the tower's activations)
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
        if key in self._entries:
            self._bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= _nbytes(old)


def _placed(model, e: VisionEmbeds) -> VisionEmbeds:
    """Carried embeddings where and as the tower would have made them (its device and dtype)."""
    tower = model.vision_tower()
    deep = None if e.deepstack is None else e.deepstack.to(tower.device, tower.dtype)
    return VisionEmbeds(e.embeds.to(tower.device, tower.dtype), deep)


def _nbytes(e: VisionEmbeds) -> int:
    deep = 0 if e.deepstack is None else e.deepstack.numel() * e.deepstack.element_size()
    return e.embeds.numel() * e.embeds.element_size() + deep


def _concat(parts: list[VisionEmbeds]) -> VisionEmbeds:
    embeds = torch.cat([p.embeds for p in parts])
    if parts[0].deepstack is None:
        return VisionEmbeds(embeds)
    return VisionEmbeds(embeds, torch.cat([p.deepstack for p in parts], dim=1))
