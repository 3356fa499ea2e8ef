"""Our models against transformers' on the same tiny checkpoints: prefill logits and greedy tokens,
in float32 (exactly) and in bfloat16 (within the noise bf16 itself makes, near-ties allowed)."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.model_runner import ScheduledChunk
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.model.inputs import Embedded
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.model.vision import encode as encode_vision
from qwenvl_pd.model.vision_loader import load_vision_tower

ARCHS = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _chat(body: str) -> str:
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


CASES = {
    "text": ("Write a haiku about the sea.", {}),
    "one_image": (f"{IMG}What is in the picture?", {"image": [_image(96, 80, 1)]}),
    "two_images": (f"{IMG}{IMG}Compare them.", {"image": [_image(64, 120, 2), _image(150, 60, 3)]}),
    "video": (f"{VID}What happens?", {"video": [_image(64, 64, 10 + i) for i in range(8)]}),
}


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_dirs):
    path = tiny_dirs[request.param]
    ours = LLM(model=str(path), max_model_len=2048)
    assert ours.stack.dtype == torch.float32  # "auto" follows the float32 checkpoint
    assert ours.model.lm_head.packed is not None  # parity covers the oneDNN-packed CPU path
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, ours, ref


def _ref_inputs(prompt):
    ids = torch.tensor([prompt.token_ids])
    # transformers 5 places M-RoPE from the modality type of each token (0 text, 1 image, 2 video)
    types = (ids == 151655).long() + 2 * (ids == 151656).long()
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}
    if prompt.images is not None:
        kw.update(pixel_values=prompt.images.pixel_values, image_grid_thw=prompt.images.image_grid_thw)
    if prompt.videos is not None:
        kw.update(pixel_values_videos=prompt.videos.pixel_values_videos,
                  video_grid_thw=prompt.videos.video_grid_thw)
        if prompt.videos.second_per_grid_ts is not None:
            kw["second_per_grid_ts"] = torch.tensor(prompt.videos.second_per_grid_ts)
    return kw


REF_TOKENS = 32
_GREEDY: dict[tuple[str, str], list[int]] = {}  # (checkpoint, case) -> transformers' greedy tokens


def transformers_greedy(path, case: str, prompt, n: int, load_ref) -> list[int]:
    """transformers' first n (<= REF_TOKENS) greedy float32 tokens for CASES[case] on the
    checkpoint at path, computed once a session: this file and the TP tests compare with the same
    ones. load_ref() -> the checkpoint's transformers model, called only when not yet computed."""
    key = (str(path), case)
    if key not in _GREEDY:
        with torch.inference_mode():
            gen = load_ref().generate(**_ref_inputs(prompt), max_new_tokens=REF_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=151643)
        _GREEDY[key] = gen[0, len(prompt.token_ids):].tolist()
    return _GREEDY[key][:n]


def _our_prefill_logits(llm: LLM, prompt) -> torch.Tensor:
    engine = llm.engine
    seq = Sequence("t", list(prompt.token_ids), prompt.positions, prompt.mrope_delta,
                   SamplingParams(), items=prompt.items)
    seq.vision = engine.encoder_cache.encode(llm.model, prompt.items) if prompt.items else None
    seq.block_ids = engine.blocks.allocate_n(engine.blocks.blocks_needed(len(seq.token_ids)))
    try:
        with torch.inference_mode():
            step = engine.runner.prepare([ScheduledChunk(seq, len(seq.token_ids))])
            hidden = llm.model(*engine.runner.inputs(step))  # all positions
            return llm.model.compute_logits(hidden)
    finally:
        engine.blocks.free(seq.block_ids)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_and_greedy_tokens_match(pair, case, tiny_dirs):
    arch, ours, ref = pair
    body, mm = CASES[case]
    request = {"prompt": _chat(body), "multi_modal_data": mm}
    prompt = ours.inputs.process(request)

    with torch.inference_mode():
        ref_logits = ref(**_ref_inputs(prompt)).logits[0]
    diff = (_our_prefill_logits(ours, prompt) - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"{arch}/{case}: max abs logit diff {diff}"

    out = ours.generate([request], SamplingParams(max_tokens=REF_TOKENS, temperature=0, ignore_eos=True))
    expected = transformers_greedy(tiny_dirs[arch], case, prompt, REF_TOKENS, lambda: ref)
    assert out[0].outputs[0].token_ids == expected


# bf16 expert matmuls are slow on CPU (transformers' and ours): MoE keeps two cases of four
BF16_CASES = [(a, c) for a in ARCHS for c in CASES if a != "qwen3_vl_moe" or c in ("text", "two_images")]


@pytest.fixture(scope="module")
def bf16_trio_of(tmp_path_factory):
    """arch -> a bf16 checkpoint's (arch, ours in bf16, transformers in bf16, transformers in
    float32: the truth), built once per family (the cases come family by family); the previous
    family's models are dropped when the next one is asked for."""
    made = {}

    def get(arch: str):
        if arch not in made:
            made.clear()
            path = make_tiny(arch, tmp_path_factory.mktemp("bf16") / arch, dtype="bfloat16")
            ours = LLM(model=str(path), max_model_len=2048, dtype="bfloat16")
            load = transformers.AutoModelForImageTextToText.from_pretrained
            made[arch] = (arch, ours, load(path, dtype=torch.bfloat16).eval(), load(path, dtype=torch.float32).eval())
        return made[arch]
    return get


def _float32_inputs(prompt):
    kw = _ref_inputs(prompt)
    return {k: v.float() if k.startswith("pixel_values") else v for k, v in kw.items()}


@pytest.mark.parametrize("arch, case", BF16_CASES)
def test_bf16_prefill_and_greedy_tokens_match_within_bf16_noise(bf16_trio_of, arch, case):
    arch, ours, ref, ref32 = bf16_trio_of(arch)
    body, mm = CASES[case]
    request = {"prompt": _chat(body), "multi_modal_data": mm}
    prompt = ours.inputs.process(request)
    assert ours.stack.dtype == torch.bfloat16
    with torch.inference_mode():
        truth = ref32(**_float32_inputs(prompt)).logits[0]
        theirs = ref(**_ref_inputs(prompt)).logits[0].float() - truth  # transformers' bf16 error
    mine = _our_prefill_logits(ours, prompt).float() - truth
    # the mean error: a few tokens whose MoE routing flips in bf16 dominate the max on either side
    assert mine.abs().mean() <= 2 * theirs.abs().mean() + 0.01, f"{arch}/{case}"
    assert mine.abs().max() <= 0.35 * truth.abs().max(), f"{arch}/{case}"

    got = ours.generate([request], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    got = got[0].outputs[0].token_ids
    with torch.inference_mode():
        gen = ref.generate(**_ref_inputs(prompt), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=151643, output_logits=True, return_dict_in_generate=True)
    expected = gen.sequences[0, len(prompt.token_ids):].tolist()
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if first is not None:  # a near-tie: transformers' own gap there is within its bf16 noise
        logits = gen.logits[first][0].float()
        gap = (logits[expected[first]] - logits[got[first]]).item()
        assert gap <= theirs.abs().max().item(), f"{arch}/{case}: token {first} differs by {gap}"


@pytest.mark.parametrize("case", ["one_image", "two_images", "video"])
def test_embeddings_of_the_vision_only_tower_generate_what_the_pixels_do(pair, case, tiny_dirs):
    """EPD's chain in one process, on every family: the encode role's vision-only tower makes
    each item's embeddings, prefill places them from their grids alone (no pixels), and the
    greedy tokens equal the pixel path's (which equal transformers', above)."""
    arch, ours, _ = pair
    text, mm = CASES[case]
    request = {"prompt": _chat(text), "multi_modal_data": mm}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = ours.generate([request], params)[0].outputs[0].token_ids
    tower = load_vision_tower(tiny_dirs[arch], ours.config, torch.float32)
    prompt = ours.inputs.process(request)
    spans = prompt.videos.second_per_grid_ts if prompt.videos is not None else None
    given = {"image": [], "video": []}
    for i, it in enumerate(prompt.items):
        with torch.inference_mode():
            made = encode_vision(tower, it.pixel_values, torch.tensor([it.grid_thw]))
        second = spans[len(given["video"])] if it.kind == "video" and spans else None
        given[it.kind].append(Embedded(it.grid_thw, f"{case}-{i}", made, second))
    placed = ours.inputs.process_expanded(prompt.token_ids, given["image"], given["video"])
    assert placed.token_ids == prompt.token_ids and torch.equal(placed.positions, prompt.positions)
    seq = Sequence(f"epd-{case}", list(placed.token_ids), placed.positions, placed.mrope_delta, params,
                   items=placed.items)
    ours.engine.add(seq)
    while ours.engine.has_work():
        ours.engine.step()
    assert seq.output_ids == want
