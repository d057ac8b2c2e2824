"""Shadow copies of OpenAI requests: once the primary generation finished, a reproducible request (greedy, or with
a seed) is replayed on the model's shadow version — its own tokenizer, template and grammar — at background
priority, and the token ids are compared (serving/shadow.py records the verdict)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ladle.api.openai_generation import Generation, matcher
from ladle.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from ladle.llm.sampling_params import SamplingParams
from ladle.serving.host import ModelHost
from ladle.serving.versions import ModelVersion

if TYPE_CHECKING:
    from ladle.llm.async_engine import AsyncEngine

#: requests of more sequences are not copied to a shadow version (a copy's cost stays bounded)
MAX_SHADOW_SEQUENCES = 16

#: renders a request's prompts for one engine (each version has its own tokenizer and template)
PromptsOf = Callable[["AsyncEngine"], Awaitable[list[list[int]]]]


def shadow_copier(host: ModelHost, mv: ModelVersion, req: CompletionRequest | ChatCompletionRequest,
                  params: SamplingParams, gen: Generation, started: float, prompts: PromptsOf,
                  prompt_param: str) -> Callable[[], None]:
    """What to call once the primary generation ended: copies the request to the model's shadow when it finished
    every choice, is reproducible and the shadow draws it. Other sampled answers differ by design."""

    def copy() -> None:
        if not (params.greedy or params.seed is not None) or any(c.finish_reason is None for c in gen.choices):
            return
        if len(gen.streams) > MAX_SHADOW_SEQUENCES or (found := host.shadow_for(mv)) is None:
            return
        shadow, target = found

        async def replay(version: ModelVersion) -> list[list[int]]:
            engine: AsyncEngine = version.engine  # type: ignore[assignment]  # the host holds AsyncEngines
            engine.precheck(len(gen.streams))
            again = await Generation.start(engine, await prompts(engine), params, await matcher(engine, req), None,
                                           prompt_param, background=True)
            try:
                await again.run()
            finally:
                again.close()
            return [c.token_ids for c in again.choices]

        shadow.copy_tokens(target, mv, [c.token_ids for c in gen.choices], replay, time.monotonic() - started)

    return copy
