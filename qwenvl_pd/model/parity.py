"""transformers as the oracle: its inputs for a prompt our processor made, its greedy tokens, and
the near-tie rule that judges a reduced-precision run against them (the parity tests and
benchmarks/parity_matrix.py share it)."""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from qwenvl_pd.model.inputs import ProcessedPrompt
from qwenvl_pd.model.tiny import TOKENS

PAD = 151643
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def chat(body: str) -> str:
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


CASES = {  # name -> (the user turn's text, multi_modal_data): the inputs every parity check runs
    "text": ("Write a haiku about the sea.", {}),
    "one_image": (f"{IMG}What is in the picture?", {"image": [image(96, 80, 1)]}),
    "two_images": (f"{IMG}{IMG}Compare them.", {"image": [image(64, 120, 2), image(150, 60, 3)]}),
    "video": (f"{VID}What happens?", {"video": [image(64, 64, 10 + i) for i in range(8)]}),
}


def case_request(case: str) -> dict:
    """CASES[case] as an LLM.generate prompt."""
    body, mm = CASES[case]
    return {"prompt": chat(body), "multi_modal_data": mm}


def ref_inputs(prompt: ProcessedPrompt, pixels: torch.dtype | None = None) -> dict:
    """transformers' keyword arguments for `prompt`; pixels: cast the pixel values (a float32
    model reading a bf16 run's pixels)."""
    ids = torch.tensor([prompt.token_ids])
    # transformers 5 places M-RoPE from the modality type of each token (0 text, 1 image, 2 video)
    types = (ids == TOKENS["image_token_id"]).long() + 2 * (ids == TOKENS["video_token_id"]).long()
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}
    if prompt.images is not None:
        kw.update(pixel_values=prompt.images.pixel_values, image_grid_thw=prompt.images.image_grid_thw)
    if prompt.videos is not None:
        kw.update(pixel_values_videos=prompt.videos.pixel_values_videos,
                  video_grid_thw=prompt.videos.video_grid_thw)
        if prompt.videos.second_per_grid_ts is not None:
            kw["second_per_grid_ts"] = torch.tensor(prompt.videos.second_per_grid_ts)
    if pixels is not None:
        kw = {k: v.to(pixels) if k.startswith("pixel_values") else v for k, v in kw.items()}
    return kw


@dataclass(frozen=True)
class Greedy:
    """transformers' greedy continuation: tokens and the logits each was chosen from."""
    tokens: list[int]
    logits: list[torch.Tensor]  # one [vocab] float32 per token


def greedy(ref, prompt: ProcessedPrompt, n: int) -> Greedy:
    """ref's (a transformers model) first n greedy tokens after `prompt`, no EOS stop."""
    with torch.inference_mode():
        gen = ref.generate(**ref_inputs(prompt), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    return Greedy(gen.sequences[0, len(prompt.token_ids):].tolist(), [x[0].float() for x in gen.logits])


def own_error(ref, ref32, prompt: ProcessedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(truth, error), both [tokens, vocab] float32: ref32's prefill logits (the same weights in
    float32) and ref's minus them, the noise ref's dtype itself makes."""
    with torch.inference_mode():
        truth = ref32(**ref_inputs(prompt, torch.float32)).logits[0]
        return truth, ref(**ref_inputs(prompt)).logits[0].float() - truth


def first_difference(got: list[int], want: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)


def near_tie_failure(got: list[int], want: Greedy, noise: float) -> str | None:
    """None when got equals want's tokens, or first leaves them where transformers' own logit
    gap between its token and ours is within `noise` (0: exact); otherwise why not."""
    first = first_difference(got, want.tokens)
    if first is None:
        return None if len(got) == len(want.tokens) else f"{len(got)} tokens, want {len(want.tokens)}"
    logits = want.logits[first]
    gap = (logits[want.tokens[first]] - logits[got[first]]).item()
    return None if gap <= noise else f"token {first}: {got[first]} != {want.tokens[first]}, gap {gap:.4f} > {noise:.4f}"
