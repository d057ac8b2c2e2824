"""ladle: a model server for classic models (KServe v2) and LLMs (OpenAI-compatible API)."""

__version__ = "0.1.0"
