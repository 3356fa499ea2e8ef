"""The engine against transformers and against itself: batching, seeds, prefix and encoder
caches, and preemption never change a result."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine import model_runner

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
WORDS = "the sea sky red blue cat dog runs over under a small large house tree river".split()


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _request(i: int) -> dict:
    rng = np.random.default_rng(i)
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 120))))
    if i % 2:
        return {"prompt": f"<|im_start|>user\n{IMG}{text}<|im_end|>\n<|im_start|>assistant\n",
                "multi_modal_data": {"image": [_image(int(rng.integers(40, 200)),
                                                      int(rng.integers(40, 200)), i)]}}
    return {"prompt": f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"}


def _ref_greedy(ref, prompt, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "mm_token_type_ids": (ids == 151655).long()}
    if prompt.images is not None:
        kw.update(pixel_values=prompt.images.pixel_values, image_grid_thw=prompt.images.image_grid_thw)
    with torch.inference_mode():
        out = ref.generate(**kw, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=151643)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def path(tiny_dirs):
    return str(tiny_dirs["qwen2_5_vl"])


@pytest.fixture(scope="module")
def llm(path):
    # a small token budget forces chunked prefill, cutting through image placeholders
    return LLM(model=path, max_model_len=1024, max_num_batched_tokens=64)


def test_32_concurrent_mixed_requests_equal_transformers_alone(llm, path):
    requests = [_request(i) for i in range(32)]
    params = [SamplingParams(max_tokens=8 + (i * 5) % 17, temperature=0, ignore_eos=True)
              for i in range(32)]
    outs = llm.generate(requests, params)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    for req, p, out in zip(requests, params, outs):
        prompt = llm.inputs.process(req)
        assert out.outputs[0].token_ids == _ref_greedy(ref, prompt, p.max_tokens)


def test_seeded_sampling_ignores_batch_composition_and_order(llm):
    reqs = [_request(i) for i in range(6)]
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    together = [o.outputs[0].token_ids for o in llm.generate(reqs, params)]
    order = [4, 1, 5, 0]
    shuffled = llm.generate([reqs[i] for i in order], [params[i] for i in order])
    for i, out in zip(order, shuffled):
        assert out.outputs[0].token_ids == together[i]
    alone = llm.generate(reqs[3], params[3])
    assert alone[0].outputs[0].token_ids == together[3]
    assert len({tuple(t) for t in together}) == 6


def test_prefix_cache_hits_same_image_and_misses_a_different_one(path):
    on = LLM(model=path, max_model_len=1024, enable_prefix_caching=True)
    off = LLM(model=path, max_model_len=1024, enable_prefix_caching=False)
    img_a, img_b = _image(112, 112, 1), _image(112, 112, 2)
    prompt = f"<|im_start|>user\n{IMG}describe the picture in detail please<|im_end|>\n<|im_start|>assistant\n"
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    req_a = {"prompt": prompt, "multi_modal_data": {"image": [img_a]}}
    req_b = {"prompt": prompt, "multi_modal_data": {"image": [img_b]}}

    first = on.generate(req_a, greedy)
    hits_before = on.engine.blocks.prefix_hits
    again = on.generate(req_a, greedy)
    assert on.engine.blocks.prefix_hits > hits_before
    other_before = on.engine.blocks.prefix_hits
    other = on.generate(req_b, greedy)
    # the image's placeholders start inside block 1 (block size 16): only block 0 may be shared
    assert on.engine.blocks.prefix_hits - other_before <= 1
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert first[0].outputs[0].token_ids == off.generate(req_a, greedy)[0].outputs[0].token_ids
    assert other[0].outputs[0].token_ids == off.generate(req_b, greedy)[0].outputs[0].token_ids
    assert on.engine.encoder_cache.hits >= 1


def test_preemption_with_a_small_pool_keeps_every_output(llm, path):
    small = LLM(model=path, max_model_len=1024, num_kv_blocks=24, max_num_batched_tokens=64)
    requests = [_request(i) for i in range(8)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = small.generate(requests, greedy)
    assert small.engine.scheduler.num_preemptions > 0
    expected = llm.generate(requests, greedy)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert small.engine.blocks.num_used_blocks == 0


def test_static_decode_path_with_padding_equals_the_dynamic_one(llm, path):
    # the path decode graphs replay (static buffers, bucket padding, scratch block), run eagerly
    static = LLM(model=path, max_model_len=1024, max_num_seqs=5, decode_graphs="eager",
                 max_num_batched_tokens=64, block_size=8)
    assert static.engine.runner.graphs.buckets == [1, 2, 4, 5]
    assert static.engine.runner.graphs.widths == [16, 32, 64, 128]  # blocks
    requests = [_request(i) for i in range(7)]
    params = [SamplingParams(max_tokens=6 + i, temperature=0, ignore_eos=True) for i in range(7)]
    got = [o.outputs[0].token_ids for o in static.generate(requests, params)]
    want = [o.outputs[0].token_ids for o in llm.generate(requests, params)]
    assert got == want
    runs = static.engine.runner.graphs.runs
    assert sum(runs.values()) > 10
    assert {width for _, width in runs} == {16, 32}  # prompts of up to 128 tokens, and longer
    scratch = static.engine.blocks.num_blocks  # the block padded rows write to
    assert static.engine.kv_cache.shape[2] == scratch + 1


def test_gather_scratch_grows_by_half_and_is_kept(llm):
    runner = llm.engine.runner
    per_block = runner.kv_cache[0, :, :1].numel()  # K and V of one block of one layer
    first = runner._gather_buffer(10_000)
    assert first.numel() == 15_000 * per_block
    assert runner._gather_buffer(15_000) is first  # fits: no new allocation
    assert runner._gather_buffer(15_002).numel() == 22_503 * per_block


def test_finish_after_prefill_stops_at_the_first_token_and_keeps_the_blocks(llm, path):
    prefill = LLM(model=path, max_model_len=1024, num_kv_blocks=64, finish_after_prefill=True)
    requests = [_request(i) for i in range(2)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = prefill.generate(requests, greedy)
    first = [o.outputs[0].token_ids[:1] for o in llm.generate(requests, greedy)]
    assert [o.outputs[0].token_ids for o in outs] == first
    assert [o.outputs[0].finish_reason for o in outs] == ["prefilled", "prefilled"]
    prompts = [len(prefill.inputs.process(r).token_ids) for r in requests]
    assert prefill.engine.blocks.num_used_blocks == sum(-(-n // 16) for n in prompts)


def _ref_prompt_logprobs(ref, prompt) -> torch.Tensor:
    """transformers' log_softmax at every prompt position [prompt_len, vocab]."""
    ids = torch.tensor([prompt.token_ids])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "mm_token_type_ids": (ids == 151655).long()}  # so that M-RoPE positions are built
    if prompt.images is not None:
        kw.update(pixel_values=prompt.images.pixel_values, image_grid_thw=prompt.images.image_grid_thw)
    with torch.inference_mode():
        return ref(**kw).logits[0].float().log_softmax(-1)


def test_prompt_logprobs_over_chunks_equal_transformers_and_read_no_prefix_cache(llm, path, monkeypatch):
    # 64-token chunks cut through the image placeholders, and each chunk's rows go through the
    # lm_head 7 at a time (256 otherwise): several slices per chunk, the last one short
    monkeypatch.setattr(model_runner, "PROMPT_SLICE", 7)
    req = {"prompt": f"<|im_start|>user\n{IMG}the cat runs over a small red house<|im_end|>\n"
                     "<|im_start|>assistant\n", "multi_modal_data": {"image": [_image(360, 320, 7)]}}
    prompt = llm.inputs.process(req)
    n = len(prompt.token_ids)
    assert n > 2 * 64
    llm.generate(req, SamplingParams(max_tokens=1, temperature=0))  # seals the prompt's blocks
    hits = llm.engine.blocks.prefix_hits
    out = llm.generate(req, SamplingParams(max_tokens=2, temperature=0.8, seed=1,
                                           repetition_penalty=1.5, prompt_logprobs=3))[0]
    assert llm.engine.blocks.prefix_hits == hits  # every position ran: none came from the cache
    ref = _ref_prompt_logprobs(transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32).eval(), prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for p in range(1, n):
        got, row, token = out.prompt_logprobs[p], ref[p - 1], prompt.token_ids[p]
        top = row.topk(3)
        # its own token first, then the top 3 of the raw distribution (no penalty, temperature)
        assert list(got) == [token] + [t for t in top.indices.tolist() if t != token]
        want = {token: float(row[token])} | dict(zip(top.indices.tolist(), top.values.tolist()))
        assert got == pytest.approx(want, abs=1e-4)
    llm.generate(req, SamplingParams(max_tokens=1, temperature=0))
    assert llm.engine.blocks.prefix_hits > hits  # its blocks were still sealed for later prompts
