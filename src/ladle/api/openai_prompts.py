"""OpenAI requests to prompt token ids: completion prompts (text or token ids) and chat messages through a template.

Invariant: everything whose cost a client controls (tokenizing, scanning token-id lists, rendering a template) runs
on the `_POOL` worker threads, never the event loop; template rendering stops at the engine's chat_template_timeout.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from ladle.api.openai_protocol import ChatCompletionRequest
from ladle.errors import InvalidInput
from ladle.llm.chat_template import DeadlineExpired, call_with_deadline

if TYPE_CHECKING:  # the engine pulls in torch; a server without LLMs never imports it
    from ladle.llm.async_engine import AsyncEngine, EngineInfo
    from ladle.llm.tokenizer import Tokenizer

T = TypeVar("T")

# Its own small pool, so slow prompts (a trusted runaway template, a megabyte to tokenize) queue among themselves
# instead of occupying the default executor other parts of the server use.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ladle-prompt")

MAX_CHAT_TEMPLATE_CHARS = 131072  # a client template (when trusted); transformers caches 128 compiled templates

# apply_chat_template parameters (and names it renders with) that decide how ladle renders, not what the template
# sees. Overridden by a client they would change the result's type (tokenize, return_dict, return_tensors,
# return_assistant_tokens_mask, tokenizer_kwargs, sanitize_control_tokens), silently cut the prompt (padding,
# truncation, max_length), swap the validated, bounded messages for unchecked ones (conversation, messages), skip
# the checks of their top-level fields (add_generation_prompt, continue_final_message), or smuggle in what ladle
# refuses at the top level (tools, documents: tool calling is not supported). chat_template is checked on its own.
# tests/llm/test_tokenizer.py checks this covers every parameter of the installed transformers' apply_chat_template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args))


# -- completions -------------------------------------------------------------------------------------------------
async def completion_prompts(engine: AsyncEngine, prompt: Any) -> list[list[int]]:
    """`prompt` (a string, strings, token ids or lists of them) as token-id lists, each checked against the vocab."""
    return await _off_loop(_completion_ids, engine.tokenizer, engine.info, prompt)


def _completion_ids(tokenizer: Tokenizer, info: EngineInfo, prompt: Any) -> list[list[int]]:
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    texts = [item for item in items if isinstance(item, str)]
    for text in texts:
        refuse_if_surely_too_long(tokenizer, text, info.max_model_len, "prompt")
    vocab_size = info.vocab_size
    encoded = iter(tokenizer.encode_batch(texts) if texts else ())  # without the GIL, unlike encode()
    prompts = []
    for item in items:
        ids = next(encoded) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidInput("the prompt encodes to no tokens", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InvalidInput(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        prompts.append(ids)
    return prompts


# -- chat --------------------------------------------------------------------------------------------------------
async def chat_prompt(engine: AsyncEngine, req: ChatCompletionRequest) -> list[int]:
    """The request's messages rendered by the chat template (the checkpoint's, or the client's where the engine
    trusts client templates) and tokenized; a template that runs past chat_template_timeout is a 400."""
    template = _client_template(req, engine.config.trust_request_chat_template)
    kwargs = _template_kwargs(req)
    timeout = engine.config.chat_template_timeout
    return await _off_loop(_render_and_encode, engine.tokenizer, req, template, kwargs, timeout,
                           engine.info.max_model_len)


def _client_template(req: ChatCompletionRequest, trusted: bool) -> str | None:
    """The client's template, if it sent one and may; a 400 naming the field otherwise."""
    from_kwargs = (req.chat_template_kwargs or {}).get("chat_template")
    param = "chat_template" if req.chat_template is not None else "chat_template_kwargs"
    template = req.chat_template if req.chat_template is not None else from_kwargs
    if template is None:
        return None
    if not trusted:
        raise InvalidInput("this server does not accept chat templates from clients (it renders the model's own); "
                           "an operator can allow them with --trust-request-chat-template", param=param)
    if req.chat_template is not None and from_kwargs is not None:
        raise InvalidInput("give the chat template once: chat_template or chat_template_kwargs.chat_template",
                           param="chat_template_kwargs")
    if not isinstance(template, str) or len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise InvalidInput(f"a chat template must be a string of at most {MAX_CHAT_TEMPLATE_CHARS} characters",
                           param=param)
    return template


def _template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    kwargs.pop("chat_template", None)  # checked by _client_template
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs)):
        raise InvalidInput(f"chat_template_kwargs may not set {', '.join(reserved)}: ladle decides these (use the "
                           "top-level add_generation_prompt / continue_final_message fields)",
                           param="chat_template_kwargs")
    if req.continue_final_message:
        kwargs["continue_final_message"] = True
    return kwargs


def _render_and_encode(tokenizer: Tokenizer, req: ChatCompletionRequest, template: str | None,
                       kwargs: dict[str, Any], timeout_s: float, max_model_len: int) -> list[int]:
    from jinja2 import TemplateError  # the llm extra's: only a served LLM renders templates

    messages = [m.as_template_dict() for m in req.messages]  # joins content parts: linear in the body, so here
    param = "messages" if template is None else ("chat_template" if req.chat_template else "chat_template_kwargs")

    def render() -> str:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            tokenize=False, chat_template=template, **kwargs,
        )

    try:
        text = call_with_deadline(render, timeout_s)
    except DeadlineExpired:
        raise InvalidInput(f"the chat template did not finish rendering these messages within {timeout_s:g} s "
                           "(--chat-template-timeout) and was stopped", param=param) from None
    except InvalidInput:
        raise
    except (TemplateError, ValueError, TypeError, LookupError, RecursionError, OverflowError) as exc:
        # the template refused the conversation (raise_exception: "roles must alternate", ...), is not valid jinja,
        # broke the sandbox's rules, or failed on the data it was given: all the request's doing
        raise InvalidInput(f"the chat template cannot render this conversation: {type(exc).__name__}: "
                           f"{str(exc)[:500]}", param=param) from None
    refuse_if_surely_too_long(tokenizer, text, max_model_len, param)
    return tokenizer.encode_batch([text], add_special_tokens=False)[0]  # encode_batch: without the GIL


def refuse_if_surely_too_long(tokenizer: Tokenizer, text: str, max_model_len: int, param: str) -> None:
    """A 400 for a text that cannot fit the context window, decided from its length before it is tokenized
    (tokenizing a megabyte costs ~2 s of a core, and materializing and freeing a million-token result holds the GIL
    for 100-200 ms: a stall of the event loop); the exact check (AsyncEngine.check_length) follows tokenizing."""
    at_least = tokenizer.min_tokens(text)
    if at_least >= max_model_len:
        raise InvalidInput(f"the prompt is at least {at_least} tokens ({len(text)} characters), but this model's "
                           f"context window is {max_model_len} tokens", param=param)
