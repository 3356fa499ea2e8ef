"""Family name -> model class and checkpoint name map."""
from qwenvl_pd.model import qwen2_5_vl, qwen3_vl

MODELS = {
    "qwen2_5_vl": (qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl.CHECKPOINT_RENAMES),
    "qwen3_vl": (qwen3_vl.Qwen3VLForConditionalGeneration, qwen3_vl.CHECKPOINT_RENAMES),
    "qwen3_vl_moe": (qwen3_vl.Qwen3VLForConditionalGeneration, qwen3_vl.CHECKPOINT_RENAMES),
}
