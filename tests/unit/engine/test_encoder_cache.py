"""The encoder cache uses embeddings an item carries (made by an encoder) instead of running the
tower, keeps them under the item's key, and the engine's output equals the pixel path's."""
import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.model.inputs import Embedded

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _request(images) -> dict:
    body = IMG * len(images) + "Describe them."
    return {"prompt": f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n",
            "multi_modal_data": {"image": images}}


@pytest.fixture(scope="module")
def llm(tiny_dirs):  # Qwen3-VL: deepstack features ride with the embeddings
    return LLM(model=str(tiny_dirs["qwen3_vl"]), max_model_len=1024)


def _tower(llm, item):
    with torch.inference_mode():
        return llm.model.encode_vision(item.pixel_values, torch.tensor([item.grid_thw]))


def test_carried_embeddings_skip_the_tower_and_are_kept_under_their_key(llm):
    prompt = llm.inputs.process(_request([_image(96, 80, 1), _image(64, 120, 2)]))
    first, second = prompt.items
    made = _tower(llm, first)
    carried = Embedded(first.grid_thw, "emb-key", made)
    got = llm.inputs.process_expanded(prompt.token_ids, [carried, _image(64, 120, 2)], []).items
    cache = llm.engine.encoder_cache
    misses, hits = cache.misses, cache.hits
    with torch.inference_mode():
        out = cache.encode(llm.model, got)
    assert (cache.misses, cache.hits) == (misses + 1, hits)  # only the second went through the tower
    n = first.num_tokens
    assert torch.equal(out.embeds[:n], made.embeds) and torch.equal(out.deepstack[:, :n], made.deepstack)
    assert torch.equal(out.embeds[n:], _tower(llm, second).embeds)
    kept = cache.get("emb-key")
    assert kept is not None and torch.equal(kept.embeds, made.embeds)
    assert cache.get("no-such-key") is None


def test_a_prompt_of_carried_embeddings_generates_what_the_pixels_do(llm):
    images = [_image(96, 80, 3), _image(150, 60, 4)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = llm.generate(_request(images), params)[0].outputs[0].token_ids
    prompt = llm.inputs.process(_request(images))
    given = [Embedded(it.grid_thw, f"k{i}", _tower(llm, it)) for i, it in enumerate(prompt.items)]
    grid_only = llm.inputs.process_expanded(prompt.token_ids, given, [])
    seq = Sequence("carried", list(grid_only.token_ids), grid_only.positions, grid_only.mrope_delta,
                   params, items=grid_only.items)
    llm.engine.add(seq)
    while llm.engine.has_work():
        llm.engine.step()
    assert seq.output_ids == want


def test_cached_embeddings_hold_no_autograd_graph(llm):
    """A cached embedding with a grad_fn kept its whole tower pass alive (2.3 GB a request of two
    896 px images on a 0.7B checkpoint): the tower must run without recording one."""
    llm.generate([_request([_image(64, 64, 7)])], SamplingParams(max_tokens=1, temperature=0))
    prompt = llm.inputs.process(_request([_image(64, 64, 7)]))
    cached = llm.engine.encoder_cache.get(prompt.items[0].content_hash)
    assert cached is not None
    assert cached.embeds.grad_fn is None and not cached.embeds.requires_grad
    assert cached.deepstack.grad_fn is None
    assert not any(p.requires_grad for p in llm.model.parameters())
