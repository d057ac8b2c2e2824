"""What the job runner needs to know of the models it feeds: how many lines of a model may run at once, and
whether a model can serve an endpoint — read from the model host, on the event loop.

Invariant: a window keeps an LLM's engine full (more lines than --max-num-seqs, fewer than its waiting limit) and
a classic model's batcher fed (two batches per instance) without ever filling its bounded queue.
"""

from __future__ import annotations

from ladle.errors import LadleError
from ladle.jobs.lines import CheckModel
from ladle.serving.host import ModelHost

DEFAULT_WINDOW = 16


def window(host: ModelHost, model: str | None, override: int | None) -> int:
    if override:
        return override
    try:
        mv = host.get(model) if model else None
    except LadleError:
        return 1  # not servable now: one line at a time finds out when it is again (503s back off)
    if mv is None:
        return DEFAULT_WINDOW
    if mv.engine is not None:
        config = mv.engine.config  # type: ignore[attr-defined]  # an AsyncEngine
        return max(1, min(config.max_num_seqs * 3 // 2, config.max_waiting_requests // 2))
    c = mv.config
    size = 2 * max(c.max_batch_size, 1) * c.instance_count
    queue = c.dynamic_batching.max_queue_size if c.dynamic_batching is not None else size
    return max(1, min(size, queue // 2))


def model_checker(host: ModelHost) -> CheckModel:
    """A snapshot of the served models' kinds, checked later on the store's thread during validation."""
    kinds = {}
    for name, record in tuple(host.models.items()):
        if record.config is not None:
            kinds[name] = record.config.backend
    return backend_checker(kinds)


def backend_checker(kinds: dict[str, str]) -> CheckModel:
    """Checks an endpoint against {model: backend} (the models a server, or a cluster's front end, serves)."""
    served = ", ".join(sorted(kinds)) or "none"

    def check(endpoint: str, model: str) -> str | None:
        backend = kinds.get(model)
        if backend is None:
            return f"model {model!r} is not served here (served: {served})"
        if endpoint == "/v1/embeddings" and backend != "sentence_transformers":
            return f"model {model!r} is not an embedding model (backend {backend}); /v1/embeddings needs one"
        if endpoint != "/v1/embeddings" and backend != "llm":
            return f"model {model!r} is not an LLM (backend {backend}); {endpoint} needs one"
        return None

    return check
