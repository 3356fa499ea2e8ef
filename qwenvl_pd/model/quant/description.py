"""quant_model_description.json: msModelSlim's map of checkpoint tensor -> scheme."""
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qwenvl_pd.model.weight_error import WeightError

DESCRIPTION = "quant_model_description.json"
SCHEMES = ("W8A8", "W8A8_DYNAMIC", "FLOAT")
METHODS = ("none", "ascend")


class QuantError(WeightError):
    """A quantised checkpoint this project cannot run, naming the tensor and the reason."""


@dataclass(frozen=True)
class QuantDescription:
    """Schemes by tensor name (already renamed to the model's names); absent means FLOAT."""
    schemes: dict = field(hash=False)
    label: str  # what the KV layout fingerprint carries, e.g. "ascend-w8a8:3f2a..."

    def scheme(self, name: str) -> str:
        return self.schemes.get(name, "FLOAT")

    def quantised(self) -> set[str]:
        return {n for n, s in self.schemes.items() if s != "FLOAT" and n.endswith(".weight")}


def resolve_method(model_dir: str | Path, requested: str | None) -> str:
    """"ascend" or "none": `requested` checked against the checkpoint, else detected from it."""
    has = (Path(model_dir) / DESCRIPTION).is_file()
    if requested is None or requested == "auto":
        return "ascend" if has else "none"
    if requested not in METHODS:
        raise QuantError(f"quantization {requested!r}: choose one of {', '.join(METHODS)}")
    if requested == "ascend" and not has:
        raise QuantError(f"{model_dir}: --quantization ascend needs {DESCRIPTION} beside the weights")
    if requested == "none" and has:
        raise QuantError(f"{model_dir} holds a quantised checkpoint ({DESCRIPTION}): "
                         "its int8 weights cannot load as float; use --quantization ascend")
    return requested


def read_description(model_dir: str | Path, method: str, renames) -> QuantDescription | None:
    """None for a float checkpoint."""
    if method == "none":
        return None
    path = Path(model_dir) / DESCRIPTION
    raw = path.read_bytes()
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as e:
        raise QuantError(f"{path}: not valid JSON ({e})") from None
    schemes = {_rename(k, renames): _scheme(path, k, v) for k, v in entries.items() if "." in k}
    kind = str(entries.get("model_quant_type", "mixed")).lower()
    return QuantDescription(schemes, f"ascend-{kind}:{hashlib.sha256(raw).hexdigest()[:16]}")


def _scheme(path: Path, key: str, value) -> str:
    if value not in SCHEMES:
        raise QuantError(f"{path.name}: tensor {key}: scheme {value!r} is not one this project "
                         f"runs ({', '.join(SCHEMES)})")
    return value


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key
