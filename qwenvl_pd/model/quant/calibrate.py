"""Turn a float checkpoint into msModelSlim's W8A8 layout (what make-tiny --quantize writes):
int8 weights with per-channel scales; static activation ranges calibrated by running
transformers' model of the same checkpoint on random tokens."""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.quant.apply import PROJECTIONS
from qwenvl_pd.model.quant.description import DESCRIPTION
from qwenvl_pd.model.registry import MODELS
from qwenvl_pd.model.shards import save_shards

MODES = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC"}
DECODER = re.compile(r"layers\.\d+\.(self_attn|mlp)\.(\w+)\.weight$")


def quantize_checkpoint(model_dir: Path, mode: str, seed: int = 0) -> None:
    """Rewrite model_dir's weights in place. w8a8: projections static W8A8 (MoE experts
    dynamic, as MindIE's Qwen3-VL W8A8); w8a8_dynamic: everything dynamic."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    ranges = _calibrate(model_dir, seed) if mode == "w8a8" else {}
    out, desc = {}, {"model_quant_type": MODES[mode], "version": "1.0.0"}
    for name, tensor in tensors.items():
        for key, (value, scheme) in _convert(name, tensor, tensors, MODES[mode], ranges).items():
            out[key] = value.contiguous()
            desc[key] = scheme
    for f in files:
        f.unlink()
    save_shards(model_dir, out)
    (model_dir / DESCRIPTION).write_text(json.dumps(desc, indent=2) + "\n")


def _convert(name, tensor, tensors, scheme, ranges) -> dict:
    """name -> {checkpoint key: (tensor, scheme)} for one float tensor."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return _experts(name, tensor)
    prefix = _projection(name)
    if prefix is None:  # a projection's bias goes in with its weight
        return {} if name.endswith(".bias") and _projection(name[:-5] + ".weight") else \
            {name: (tensor, "FLOAT")}
    bias = tensors.get(prefix + ".bias")
    if scheme == "W8A8":
        return _static(prefix, tensor, bias, ranges[prefix])
    return _dynamic(prefix, tensor, bias)


def _projection(name: str) -> str | None:
    """"...layers.N.self_attn.q_proj" for a decoder projection's weight, else None."""
    m = DECODER.search(name)
    return name.removesuffix(".weight") if m and m.group(2) in PROJECTIONS else None


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (int8 [out, in], scale [out, 1]): symmetric per output channel."""
    scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8), scale


def _dynamic(prefix: str, w: torch.Tensor, bias) -> dict:
    q, scale = quantize_weight(w)
    out = {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale,
           f"{prefix}.weight_offset": torch.zeros_like(scale)}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.float()
    return {k: (v, "W8A8_DYNAMIC") for k, v in out.items()}


def _static(prefix: str, w: torch.Tensor, bias, lo_hi: tuple[float, float]) -> dict:
    q, scale = quantize_weight(w)
    lo, hi = min(lo_hi[0], 0.0), max(lo_hi[1], 0.0)
    in_scale = torch.tensor([(hi - lo) / 255 or 1.0])
    in_offset = torch.round(-128 - lo / in_scale).clamp(-128, 127)
    deq = (in_scale * scale[:, 0]).float()
    b = bias.float() if bias is not None else torch.zeros(w.shape[0])
    # the activation offset's share of x_q @ w^T is taken back out here, once per channel
    quant_bias = torch.round(b / deq) - in_offset * q.sum(1, dtype=torch.int32)
    out = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale),
           "input_scale": in_scale, "input_offset": in_offset, "deq_scale": deq,
           "quant_bias": quant_bias.to(torch.int32)}
    return {f"{prefix}.{k}": (v, "W8A8") for k, v in out.items()}


def _experts(name: str, fused: torch.Tensor) -> dict:
    """Fused released-layout experts -> one dynamic linear per expert and projection."""
    prefix, kind = name.rsplit(".", 1)
    out = {}
    for e, w in enumerate(fused):
        if kind == "down_proj":  # [inter, hidden] -> [hidden, inter]
            out.update(_dynamic(f"{prefix}.{e}.down_proj", w.t(), None))
            continue
        gate, up = w.t().chunk(2, dim=0)  # [hidden, 2*inter] -> 2 x [inter, hidden]
        out.update(_dynamic(f"{prefix}.{e}.gate_proj", gate, None))
        out.update(_dynamic(f"{prefix}.{e}.up_proj", up, None))
    return out


def _calibrate(model_dir: Path, seed: int, tokens: int = 96) -> dict[str, tuple[float, float]]:
    """(min, max) of every decoder projection's input over random tokens, by checkpoint name."""
    import transformers
    hf = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    renames = MODELS[ModelConfig.from_hf(model_dir).family][1]
    ranges, hooks = {}, []
    for name, module in hf.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(_recorder(ranges, _rename(name, renames))))
    ids = torch.randint(0, 150000, (2, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        hf(input_ids=ids)
    for h in hooks:
        h.remove()
    return ranges


def _recorder(ranges: dict, name: str):
    def hook(_module, args):
        x = args[0]
        lo, hi = ranges.get(name, (0.0, 0.0))
        ranges[name] = (min(lo, x.min().item()), max(hi, x.max().item()))
    return hook


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key
