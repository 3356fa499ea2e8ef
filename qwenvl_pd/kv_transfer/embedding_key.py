"""The content address of one media item's vision embeddings, the same on proxy, encode and
prefill (torch-free: the proxy imports it).

Two items share a key exactly when the tower would see the same pixels through the same weights:
the bytes' hash, the grid the processor gives them, a video's sampling (fps, frame count, time
steps) and the vision weights' fingerprint (model/vision_fingerprint.py).
"""
from __future__ import annotations

import hashlib
import json

from qwenvl_pd.messages import MediaItem

KEY_VERSION = 1  # bump when the fields below change: old keys must never match new ones


def embedding_key(item: MediaItem, vision_fingerprint: str) -> str:
    """sha256 hex over the item's identity (never its bytes: content_hash stands for them)."""
    fields = {
        "v": KEY_VERSION, "kind": item.kind, "content_hash": item.content_hash,
        "grid_thw": list(item.grid_thw), "fps": item.fps, "num_frames": len(item.frames),
        "second_per_grid_t": item.second_per_grid_t, "timestamps": list(item.timestamps),
        "vision": vision_fingerprint,
    }
    # sorted keys, no spaces, floats by repr: every Python process writes the same bytes
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def bytes_hash(data: bytes) -> str:
    """The content hash of a media file's bytes (what the proxy puts in MediaItem.content_hash)."""
    return hashlib.sha256(data).hexdigest()
