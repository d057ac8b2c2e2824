"""What one OpenAI request may ask of an LLM engine, checked before any per-prompt work: its fan-out
(prompts x n) and its deadline (the `timeout` field, the X-Request-Timeout header, the server default).

Invariant: everything here is O(1) or O(number of prompts) on the parsed request; nothing tokenizes.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request

from ladle.api.body import is_batch
from ladle.api.openai_protocol import MAX_TIMEOUT_S
from ladle.config import LLMConfig
from ladle.errors import InvalidInput

TIMEOUT_HEADER = "x-request-timeout"


def count_prompts(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds (a string, token ids, or a list of either)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


def check_fan_out(config: LLMConfig, num_prompts: int, n: int, prompt_param: str) -> None:
    """prompts x n over max_sequences_per_request is a 400, before anything is tokenized or allocated."""
    limit = config.max_sequences_per_request
    if num_prompts * n > limit:
        raise InvalidInput(
            f"the request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; at most {limit} "
            "are allowed per request; lower n or send fewer prompts per request",
            param="n" if n > 1 else prompt_param,
        )


def deadline(request: Request, timeout: float | None, config: LLMConfig, started: float) -> float | None:
    """The request's deadline in time.monotonic() terms: the smallest of the body's `timeout`, the
    X-Request-Timeout header and the server's request_timeout (0: none), counted from `started`."""
    limits = [t for t in (timeout, _header_timeout(request)) if t is not None]
    if config.request_timeout > 0 and not is_batch(request):  # a batch line has its job's completion window
        limits.append(config.request_timeout)
    return started + min(limits) if limits else None


def _header_timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= MAX_TIMEOUT_S:  # NaN fails this too
        raise InvalidInput(f"the X-Request-Timeout header must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                           f"got {raw[:40]!r}", param="X-Request-Timeout")
    return value
