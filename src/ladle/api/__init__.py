"""The HTTP edge: app factory, protocol adapters (KServe v2, OpenAI), health, metrics."""
