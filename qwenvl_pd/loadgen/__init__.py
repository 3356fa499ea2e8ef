"""Load generation against any OpenAI-compatible endpoint (`qwenvl-pd bench`, benchmarks/serve.py)."""
