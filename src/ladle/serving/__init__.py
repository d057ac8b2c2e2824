"""The serving layer: one ModelHost owns every served model (classic versions with their batchers, LLM engines,
embeddings), above repository/, runtimes/, batching/ and llm/. The HTTP adapters talk only to it."""
