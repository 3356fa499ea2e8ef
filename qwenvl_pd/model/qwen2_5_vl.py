"""Qwen2.5-VL: attribute names follow the released checkpoints (model.layers.*, visual.*)."""
from torch import nn

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel
from qwenvl_pd.model.layers.linear import Linear
from qwenvl_pd.model.text import TextModel
from qwenvl_pd.model.vision import build_vision_tower


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text)
        self.visual = build_vision_tower(config.family, config.vision)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def language_model(self) -> TextModel:
        return self.model

    def vision_tower(self) -> nn.Module:
        return self.visual


# transformers 5 may save the nested layout; map it back to the released one
CHECKPOINT_RENAMES = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
]
