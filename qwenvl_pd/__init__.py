"""qwenvl-pd: prefill-decode disaggregated serving for the Qwen vision-language family."""
__version__ = "0.1.0"


def __getattr__(name):
    # keep `import qwenvl_pd` light: torch and transformers load only when the offline API is used
    if name == "LLM":
        from qwenvl_pd.llm import LLM
        return LLM
    if name == "SamplingParams":
        from qwenvl_pd.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
