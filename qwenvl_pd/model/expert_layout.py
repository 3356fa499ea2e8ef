"""The two layouts fused MoE expert tensors come in. Released Qwen3-VL-MoE checkpoints store
gate_up_proj [E, hidden, 2*inter] and down_proj [E, inter, hidden] (x @ w); transformers 5's
save_pretrained writes both transposed (w @ x, nn.Linear's [out, in]). The shapes tell them
apart unless the two inner sizes are equal; then the transformers version that saved it does."""
import json
from pathlib import Path

import torch

RELEASED, TRANSFORMERS5 = "released", "transformers-5"


def fused_experts(param: torch.Tensor) -> torch.Tensor:
    """Mark a [E, a, b] expert parameter (released layout) as loadable from either layout."""
    param.fused_experts = True
    return param


def which_layout(shape: tuple[int, ...], released: tuple[int, ...], saved_major: int) -> str | None:
    """The layout a checkpoint tensor of `shape` is in, given the shape the released layout
    has; None when it is in neither."""
    swapped = (released[0], released[2], released[1])
    fits = [name for name, s in ((RELEASED, released), (TRANSFORMERS5, swapped)) if tuple(shape) == s]
    if len(fits) == 2:  # square inner dims: only who saved it can tell
        return TRANSFORMERS5 if saved_major >= 5 else RELEASED
    return fits[0] if fits else None


def saved_major(model_dir: Path) -> int:
    """The major version of transformers that wrote config.json (0 when it does not say)."""
    try:
        version = json.loads((model_dir / "config.json").read_text()).get("transformers_version", "")
        return int(str(version).split(".")[0])
    except (ValueError, OSError):
        return 0
