"""Model implementations over the paged KV cache; `registry` maps HF architecture names to them."""
