"""A checkpoint directory -> ModelInfo: all the proxy needs of the model, so that it mounts no
model files (prefill's GetModelInfo and the colocated backend both serve it)."""
import json
from pathlib import Path

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.messages import ModelInfo


def model_info(model_dir: str, cfg: ModelConfig, max_model_len: int, served_model_name: str = "") -> ModelInfo:
    d = Path(model_dir)
    return ModelInfo(
        served_model_name=served_model_name or d.name, family=cfg.family,
        tokenizer_json=_read(d / "tokenizer.json").encode(),
        tokenizer_config_json=_read(d / "tokenizer_config.json").encode(),
        chat_template=_chat_template(d), preprocessor_config_json=_read(d / "preprocessor_config.json"),
        max_model_len=max_model_len, eos_token_ids=cfg.eos_token_ids,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        video_preprocessor_config_json=_read(d / "video_preprocessor_config.json"),
        generation_config_json=_read(d / "generation_config.json"))


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _chat_template(model_dir: Path) -> str:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        text = _read(model_dir / name)
        if not text:
            continue
        if name.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if template:
            return template
    return ""
