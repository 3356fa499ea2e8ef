"""Qwen3-VL dense and MoE: model.language_model.*, model.visual.* as in the released checkpoints."""
from torch import nn

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.layers.linear import Linear
from qwenvl_pd.model.text import TextModel
from qwenvl_pd.model.vision import build_vision_tower


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.language_model = TextModel(config.text)
        self.visual = build_vision_tower(config.family, config.vision)


class Qwen3VLForConditionalGeneration(VisionLanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def language_model(self) -> TextModel:
        return self.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.visual


CHECKPOINT_RENAMES = [
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
]
