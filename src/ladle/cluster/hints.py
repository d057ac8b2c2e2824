"""What the request router may know of a request before it picks a replica: the model, a session key for
stickiness, and the head of an LLM prompt for prefix-aware routing — read by the front end, carried with the call.

Invariant: a hint is small and bounded whatever the client sent (at most PREFIX_CHARS of prompt, SESSION_CHARS of
session key), and reading one never raises: a body without these fields simply routes on load alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any

#: prompt characters the router looks at: enough to tell shared system prompts and few-shot heads apart
PREFIX_CHARS = 4096
SESSION_CHARS = 256
SESSION_HEADER = b"x-session-id"


@dataclass(frozen=True, slots=True)
class RouteHint:
    model: str
    session: str | None = None  # X-Session-Id, or the OpenAI `user` field: same key, same replica
    prefix: str | None = None  # the prompt's head (LLM requests): same prefix, same replica's prefix cache
    replica: str | None = None  # only this replica, if it is there (the front end's metrics scrape)


def session_key(headers: list[tuple[bytes, bytes]], body: dict[str, Any] | None) -> str | None:
    for key, value in headers:
        if key == SESSION_HEADER and value:
            return value.decode("latin-1")[:SESSION_CHARS]
    user = body.get("user") if body else None
    return user[:SESSION_CHARS] if isinstance(user, str) and user else None


def prompt_head(body: dict[str, Any]) -> str | None:
    """The first PREFIX_CHARS of what the model will read: chat messages (role and text) in order, or a completion's
    prompt (the first one of a list; token ids as text)."""
    messages = body.get("messages")
    if isinstance(messages, list):  # every item costs a step even when it adds no text: islice bounds the walk
        return _join(_message_text(m) for m in islice(messages, PREFIX_CHARS)) or None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: route on the first
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS] or None
    if isinstance(prompt, list):  # token ids
        return _join(f"{t}," for t in islice(prompt, PREFIX_CHARS) if isinstance(t, int)) or None
    return None


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text
        content = _join(p["text"] for p in islice(content, PREFIX_CHARS)
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"{role if isinstance(role, str) else ''}:{content if isinstance(content, str) else ''}\n"


def _join(parts: Any) -> str:
    out: list[str] = []
    size = 0
    for part in parts:
        out.append(part)
        size += len(part)
        if size >= PREFIX_CHARS:
            break
    return "".join(out)[:PREFIX_CHARS]
