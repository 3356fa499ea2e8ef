"""The interface every model family implements."""
import torch
from torch import nn

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.layers.attention import AttentionMetadata
from qwenvl_pd.model.layers.linear import Linear, column_linear
from qwenvl_pd.model.layers.mlp import GatedMLP
from qwenvl_pd.model.layers.moe import Experts
from qwenvl_pd.model.parallel import TensorParallel, gather_columns
from qwenvl_pd.model.text import Attention, TextModel, VisualInjection
from qwenvl_pd.model.vision import VisionEmbeds, encode


class VisionLanguageModel(nn.Module):
    """language_model(), vision_tower() locate the parts; the family decides the attribute names,
    which are the checkpoint's own so that loading is a name map."""

    config: ModelConfig
    tp: TensorParallel

    def language_model(self) -> TextModel:
        raise NotImplementedError

    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, visual: VisualInjection | None = None) -> torch.Tensor:
        return self.language_model()(input_ids, positions, kv_cache, meta, visual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (every rank's vocab slice)."""
        logits = gather_columns(self.lm_head(hidden).float(), self.tp)
        return logits[:, :self.config.text.vocab_size]  # the padded vocab rows of the last shard

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionEmbeds:
        return encode(self.vision_tower(), pixel_values, grid_thw)

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model().embed_tokens.weight

    def pack_weights(self) -> None:
        """Reorder the text linears once for oneDNN (CPU float32 and native bf16; elsewhere a
        no-op) and hold MoE experts as [E, out, in]. Call after loading: the packed copies do not
        follow later writes to the parameters."""
        for module in self.language_model().modules():
            if isinstance(module, (Attention, GatedMLP, Experts)):
                module.pack()
        self.lm_head.pack()


def lm_head(config: ModelConfig, tp: TensorParallel) -> Linear:
    """The output projection, split by vocabulary rows like the embedding it may be tied to."""
    vocab = config.text.vocab_size
    return column_linear(config.text.hidden_size, vocab, False, tp.padded_split(vocab))
