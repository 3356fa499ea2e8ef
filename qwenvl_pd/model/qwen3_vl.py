"""Qwen3-VL dense and MoE: model.language_model.*, model.visual.* as in the released checkpoints."""
from torch import nn

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.base import VisionLanguageModel, lm_head
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.model.text import TextModel
from qwenvl_pd.model.vision import build_vision_tower


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, vision: bool):
        super().__init__()
        self.language_model = TextModel(config.text, tp)
        # rank 0 alone encodes images; the other ranks receive the embeddings with the step
        self.visual = build_vision_tower(config.family, config.vision) if tp.rank == 0 and vision else None


class Qwen3VLForConditionalGeneration(VisionLanguageModel):
    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel(), vision: bool = True):
        super().__init__()
        self.config, self.tp = config, tp
        self.model = _Backbone(config, tp, vision)
        self.lm_head = lm_head(config, tp)

    def language_model(self) -> TextModel:
        return self.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.visual


CHECKPOINT_RENAMES = [
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
]
