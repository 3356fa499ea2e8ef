"""Our models against transformers' on the same tiny checkpoints: prefill logits and greedy tokens,
in float32 (exactly) and in bfloat16 (within the noise bf16 itself makes, near-ties allowed)."""
import pytest
import torch
import transformers

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.model_runner import ScheduledChunk
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.model.inputs import Embedded
from qwenvl_pd.model.parity import CASES, chat, greedy, near_tie_failure, own_error, ref_inputs
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.model.vision import encode as encode_vision
from qwenvl_pd.model.vision_loader import load_vision_tower

ARCHS = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_dirs):
    path = tiny_dirs[request.param]
    ours = LLM(model=str(path), max_model_len=2048)
    assert ours.stack.dtype == torch.float32  # "auto" follows the float32 checkpoint
    assert ours.model.lm_head.packed is not None  # parity covers the oneDNN-packed CPU path
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, ours, ref


REF_TOKENS = 32
_GREEDY: dict[tuple[str, str], list[int]] = {}  # (checkpoint, case) -> transformers' greedy tokens


def transformers_greedy(path, case: str, prompt, n: int, load_ref) -> list[int]:
    """transformers' first n (<= REF_TOKENS) greedy float32 tokens for CASES[case] on the
    checkpoint at path, computed once a session: this file and the TP tests compare with the same
    ones. load_ref() -> the checkpoint's transformers model, called only when not yet computed."""
    key = (str(path), case)
    if key not in _GREEDY:
        _GREEDY[key] = greedy(load_ref(), prompt, REF_TOKENS).tokens
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
    request = {"prompt": chat(body), "multi_modal_data": mm}
    prompt = ours.inputs.process(request)

    with torch.inference_mode():
        ref_logits = ref(**ref_inputs(prompt)).logits[0]
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


@pytest.mark.parametrize("arch, case", BF16_CASES)
def test_bf16_prefill_and_greedy_tokens_match_within_bf16_noise(bf16_trio_of, arch, case):
    arch, ours, ref, ref32 = bf16_trio_of(arch)
    body, mm = CASES[case]
    request = {"prompt": chat(body), "multi_modal_data": mm}
    prompt = ours.inputs.process(request)
    assert ours.stack.dtype == torch.bfloat16
    truth, theirs = own_error(ref, ref32, prompt)  # transformers' bf16 error
    mine = _our_prefill_logits(ours, prompt).float() - truth
    # the mean error: a few tokens whose MoE routing flips in bf16 dominate the max on either side
    assert mine.abs().mean() <= 2 * theirs.abs().mean() + 0.01, f"{arch}/{case}"
    assert mine.abs().max() <= 0.35 * truth.abs().max(), f"{arch}/{case}"

    got = ours.generate([request], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    # a near-tie is allowed: where we part, transformers' own gap is within its bf16 noise
    failure = near_tie_failure(got[0].outputs[0].token_ids, greedy(ref, prompt, 32), theirs.abs().max().item())
    assert failure is None, f"{arch}/{case}: {failure}"


@pytest.mark.parametrize("case", ["one_image", "two_images", "video"])
def test_embeddings_of_the_vision_only_tower_generate_what_the_pixels_do(pair, case, tiny_dirs):
    """EPD's chain in one process, on every family: the encode role's vision-only tower makes
    each item's embeddings, prefill places them from their grids alone (no pixels), and the
    greedy tokens equal the pixel path's (which equal transformers', above)."""
    arch, ours, _ = pair
    text, mm = CASES[case]
    request = {"prompt": chat(text), "multi_modal_data": mm}
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
