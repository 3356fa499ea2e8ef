"""Values the engine derives from its config."""
from qwenvl_pd.engine.engine_config import CPU_FILL_TOKENS, EngineConfig, fill_tokens_for


def test_a_cpu_prefill_fills_steps_to_256_tokens_and_everything_else_to_its_budget():
    prefill = EngineConfig(finish_after_prefill=True)
    assert (CPU_FILL_TOKENS, fill_tokens_for(prefill, "cpu")) == (256, 256)
    assert fill_tokens_for(prefill, "cuda") == fill_tokens_for(prefill, "npu") == 0
    assert fill_tokens_for(EngineConfig(), "cpu") == 0  # colocated: decodes share its steps
    assert fill_tokens_for(EngineConfig(finish_after_prefill=True, step_fill_tokens=64), "cpu") == 64
    assert fill_tokens_for(EngineConfig(step_fill_tokens=0, finish_after_prefill=True), "cpu") == 0
