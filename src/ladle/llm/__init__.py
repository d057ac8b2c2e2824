"""LLM serving: continuous batching over a paged KV cache (see DESIGN.md, "llm")."""
