"""Qwen2.5-VL: attribute names follow the released checkpoints (model.layers.*, visual.*)."""
from torch import nn

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel, lm_head
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.model.text import TextModel
from qwenvl_pd.model.vision import build_vision_tower


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel(), vision: bool = True):
        super().__init__()
        self.config, self.tp = config, tp
        self.model = TextModel(config.text, tp)
        # rank 0 alone encodes images; the other ranks receive the embeddings with the step
        self.visual = build_vision_tower(config.family, config.vision) if tp.rank == 0 and vision else None
        self.lm_head = lm_head(config, tp)

    def language_model(self) -> TextModel:
        return self.model

    def vision_tower(self) -> nn.Module:
        return self.visual


# transformers 5 may save the nested layout; map it back to the released one
CHECKPOINT_RENAMES = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
]
