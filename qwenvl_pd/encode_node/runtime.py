"""What an encode node holds: the vision tower alone, its fingerprint, the embedding pool's
bytes registered with Mooncake, the optional store client, and the worker that fills the pool."""
from __future__ import annotations

import logging
import socket
import uuid

import torch

from qwenvl_pd.encode_node.batcher import EncodeBatcher
from qwenvl_pd.encode_node.config import EncodeConfig
from qwenvl_pd.encode_node.pool import EmbeddingPool
from qwenvl_pd.encode_node.worker import EncodeWork, EntryLayout
from qwenvl_pd.kv_transfer.embedding_store import EmbeddingStore
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.model.vision_fingerprint import vision_fingerprint
from qwenvl_pd.model.vision_loader import load_vision_tower
from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.platform import default_dtype, detect_device

log = logging.getLogger(__name__)


class EncodeRuntime:
    def __init__(self, cfg: EncodeConfig):
        self.cfg = cfg
        self.instance_id = cfg.instance_id or f"encode-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.config = ModelConfig.from_hf(cfg.model)
        device = detect_device(cfg.device)
        self.dtype = default_dtype(device, cfg.dtype, self.config.torch_dtype)
        self.tower = load_vision_tower(cfg.model, self.config, self.dtype, device)
        self.fingerprint = vision_fingerprint(self.config.family, self.config.vision, self.tower)
        self.merge = self.config.vision.spatial_merge_size
        self.layout = EntryLayout(self.config.vision.out_hidden_size, self.config.vision.num_deepstack, self.dtype)
        self.pool = EmbeddingPool(cfg.embedding_cache_bytes)
        self.arena = torch.zeros(self.pool.capacity, dtype=torch.uint8, device=device)
        self.transfer = KVTransferEngine(cfg.host, cfg.transfer_protocol, cfg.transfer_device)
        self.base = self.transfer.register(self.arena)
        self.store = self._store()
        self.work = EncodeWork(self.tower, self.pool, self.arena, self.layout,
                               VisionPreprocessConfig.from_dir(cfg.model), self.config.family, self.store)
        self.batcher = EncodeBatcher(self.work, cfg.max_encode_batch_tokens)
        log.info("encode %s: %s tower in %s on %s, vision fingerprint %s, pool %.2f GiB at %s",
                 self.instance_id, self.config.family, str(self.dtype).removeprefix("torch."), device,
                 self.fingerprint[:16], self.pool.capacity / 2**30, self.transfer.session_id)

    def _store(self) -> EmbeddingStore | None:
        if not self.cfg.embedding_store:
            return None
        try:
            store = EmbeddingStore(self.cfg.embedding_store, self.cfg.host, self.cfg.store_segment_bytes,
                                   protocol=self.cfg.transfer_protocol, device=self.cfg.transfer_device)
        except BaseException:
            self.transfer.close()
            raise
        log.info("embedding store tier: Mooncake master %s", self.cfg.embedding_store)
        return store

    def close(self) -> None:
        self.batcher.stop()  # no write into the arena after this
        if self.store is not None:
            self.store.close()
        self.transfer.close()
