"""One batch through the encode worker on the tiny Qwen3-VL tower: one forward for all misses,
each entry's bytes in handle order, pool hits not encoded again, failures kept to their item."""
import io
from concurrent.futures import Future

import pytest
import torch
from PIL import Image

from qwenvl_pd.encode_node.batcher import Job
from qwenvl_pd.encode_node.media import MediaError, to_pixels
from qwenvl_pd.encode_node.pool import EmbeddingPool, PoolError
from qwenvl_pd.encode_node.worker import EncodeWork, EntryLayout
from qwenvl_pd.kv_transfer.embedding_key import bytes_hash
from qwenvl_pd.messages import MediaItem
from qwenvl_pd.model.vision import encode
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.model.vision_loader import load_vision_tower
from qwenvl_pd.model_config import ModelConfig

GRID = (1, 14, 20)  # a 64x48 image, tiny Qwen3-VL processor: 70 tokens


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def job(key: str, data: bytes, waiters: int = 1) -> Job:
    item = MediaItem(kind="image", content_hash=bytes_hash(data), grid_thw=GRID, data=data)
    return Job(key, item, 70, [(30.0, Future()) for _ in range(waiters)])


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    cfg = ModelConfig.from_hf(tiny_dirs["qwen3_vl"])
    tower = load_vision_tower(tiny_dirs["qwen3_vl"], cfg, torch.float32)
    layout = EntryLayout(cfg.vision.out_hidden_size, cfg.vision.num_deepstack, torch.float32)
    return tower, layout, VisionPreprocessConfig.from_dir(tiny_dirs["qwen3_vl"]), cfg.family


def work(parts, capacity: int) -> EncodeWork:
    tower, layout, vision, family = parts
    pool = EmbeddingPool(capacity)
    return EncodeWork(tower, pool, torch.zeros(pool.capacity, dtype=torch.uint8), layout, vision, family)


def test_misses_share_one_forward_and_land_in_handle_order(parts):
    w = work(parts, 1 << 20)
    jobs = [job("a", png((200, 0, 0)), waiters=2), job("b", png((0, 0, 200)))]
    w(jobs)
    assert (w.misses, w.hits, w.pool.keys()) == (2, 0, ["a", "b"])
    served = jobs[1].waiters[0][1].result()
    assert (served.source, served.entry.offset, served.entry.nbytes) == ("encoded", 107520, 107520)
    px = to_pixels(jobs[0].item, parts[2], parts[3])
    with torch.inference_mode():
        alone = encode(parts[0], px.values, torch.tensor([px.grid_thw]))
    got = w.arena[:107520].view(torch.float32).view(3, 70, 128)
    torch.testing.assert_close(got[0], alone.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], alone.deepstack, rtol=1e-5, atol=1e-5)
    assert len({f.result().lease.lease_id for _, f in jobs[0].waiters}) == 2


def test_a_job_already_in_the_pool_is_not_encoded_again(parts):
    w = work(parts, 1 << 20)
    w([job("a", png((200, 0, 0)))])
    again = job("a", png((200, 0, 0)), waiters=3)
    w([again])
    assert (w.misses, w.hits) == (1, 3)
    assert {f.result().source for _, f in again.waiters} == {"pool"}


def test_failures_stay_with_their_item(parts):
    w = work(parts, 1 << 20)
    bad, good = job("bad", b"not an image"), job("good", png((0, 90, 0)))
    w([bad, good])
    assert isinstance(bad.waiters[0][1].exception(), MediaError)
    assert good.waiters[0][1].result().source == "encoded"


def test_an_entry_larger_than_the_pool_is_refused(parts):
    w = work(parts, 64 * 1024)
    big = job("a", png((200, 0, 0)))
    w([big])
    with pytest.raises(PoolError, match="needs 107520 bytes, more than the whole pool"):
        big.waiters[0][1].result()


def test_qwen2_5_vl_entries_hold_embeds_only(tiny_dirs):
    cfg = ModelConfig.from_hf(tiny_dirs["qwen2_5_vl"])
    tower = load_vision_tower(tiny_dirs["qwen2_5_vl"], cfg, torch.float32)
    layout = EntryLayout(cfg.vision.out_hidden_size, cfg.vision.num_deepstack, torch.float32)
    w = work((tower, layout, VisionPreprocessConfig.from_dir(tiny_dirs["qwen2_5_vl"]), cfg.family), 1 << 20)
    data = png((5, 5, 5))
    item = MediaItem(kind="image", content_hash=bytes_hash(data), grid_thw=(1, 4, 4), data=data)
    j = Job("a", item, 4, [(30.0, Future())])
    w([j])
    entry = j.waiters[0][1].result().entry
    assert (entry.num_tokens, entry.num_deepstack, entry.nbytes) == (4, 0, 4 * 128 * 4)
