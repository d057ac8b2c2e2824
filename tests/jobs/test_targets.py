"""What the runner reads of the host (jobs/targets.py): the per-model window of lines in flight and the model checks
of validation, on a real host with the demo's classic models loaded."""

from __future__ import annotations

import asyncio

from ladle.jobs import targets
from ladle.metrics import Metrics
from ladle.serving.host import ModelHost


def test_windows_and_model_checks(demo_repository):
    async def run() -> None:
        host = ModelHost(demo_repository, Metrics())
        try:
            await host.load_all(["iris", "minilm"])
            iris = host.get("iris").config
            assert targets.window(host, "iris", None) == 2 * iris.max_batch_size * iris.instance_count
            assert targets.window(host, "iris", 5) == 5  # --batch-lines-in-flight
            assert targets.window(host, "nope", None) == 1  # not servable now: one line finds out
            check = targets.model_checker(host)
            assert check("/v1/embeddings", "minilm") is None
            assert "not an LLM" in check("/v1/chat/completions", "minilm")
            assert "not an embedding model" in check("/v1/embeddings", "iris")
            assert "'gpt' is not served here (served: iris, minilm)" in check("/v1/completions", "gpt")
        finally:
            await host.close()

    asyncio.run(run())
