"""Building OpenAI response bodies and stream chunks from engine deltas.

Pure functions and small accumulators: no HTTP, no engine. Field names and shapes follow the
OpenAI API reference so the official `openai` client parses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ladle.llm.output_processor import StreamDelta
from ladle.llm.outputs import TokenLogprobs

if TYPE_CHECKING:  # the tokenizer needs the llm extra: a core install never imports it
    from ladle.llm.tokenizer import Tokenizer


@dataclass
class Choice:
    """One choice's text, tokens and logprobs so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_output_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, delta: StreamDelta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.num_output_tokens = delta.num_output_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], rows: list[TokenLogprobs | None], text_offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = tokenizer.token_texts(token_ids)
    offsets, position = [], text_offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    tops = []
    for row in rows:
        if row is None:
            tops.append(None)
            continue
        alternatives = tokenizer.token_texts([t for t, _ in row.top])
        tops.append({text: lp for text, (_, lp) in zip(alternatives, row.top, strict=True)})
    return {
        "tokens": texts,
        "token_logprobs": [None if row is None else row.logprob for row in rows],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def echo_logprobs(
    tokenizer: Tokenizer, prompt: list[int], rows: list[TokenLogprobs | None] | None, generated: dict[str, Any]
) -> dict[str, Any]:
    """`echo` with `logprobs`: the prompt tokens' entries (the first has none: nothing precedes it), then the
    generated ones. `generated` must already count its text offsets from the end of the echoed prompt."""
    echoed = completion_logprobs(tokenizer, prompt, rows or [None] * len(prompt), 0)
    return {key: echoed[key] + generated[key] for key in echoed}


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], rows: list[TokenLogprobs | None]) -> dict[str, Any]:
    """The chat `logprobs` object: one entry per token with its top alternatives."""
    texts = tokenizer.token_texts(token_ids)
    content = []
    for text, row in zip(texts, rows, strict=True):
        if row is None:
            continue
        alternatives = tokenizer.token_texts([t for t, _ in row.top])
        content.append({
            "token": text, "logprob": row.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": alt, "logprob": lp, "bytes": list(alt.encode("utf-8"))}
                for alt, (_, lp) in zip(alternatives, row.top, strict=True)
            ],
        })
    return {"content": content}
