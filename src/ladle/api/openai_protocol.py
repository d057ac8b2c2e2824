"""Request schemas of the OpenAI-compatible API (pydantic, at the edge only) and their mapping to
SamplingParams. Unknown fields are ignored like OpenAI does; wrong values are 400s naming the field.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ladle.errors import InvalidInput
from ladle.llm.sampling_params import SamplingParams, StructuredSpec

Schema = TypeVar("Schema", bound=BaseModel)

# Bounds on what one request may ask for; each is a 400 naming the field (README: "Hostile input"). The engine pays
# per token for stop strings (matched on the engine thread), and per step for stop_token_ids and logit_bias.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: the matcher holds back up to this many characters of output
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's own limit
MAX_MESSAGES = 2048  # OpenAI's own limit
MAX_CONTENT_PARTS = 256  # per message
INT64_MAX = 2**63 - 1
TOP_K_MAX = 2**31 - 1  # any k >= the vocabulary means "off"; beyond int64 it would fail the engine step
MAX_TIMEOUT_S = 86400.0  # a request's deadline: the `timeout` field and the X-Request-Timeout header


#: bodies larger than this are parsed and validated on a worker thread. orjson and pydantic hold the GIL while they
#: work (~12 ms per MiB of token ids), so the thread does not make that time free for the event loop, but it lets
#: the loop run between the two phases; what bounds the stall is the body limit (--max-openai-request-bytes)
PARSE_INLINE_MAX_BYTES = 256 * 1024


async def parse_body(body: bytes, schema: type[Schema]) -> Schema:
    """parse_request, off the event loop when the body is large."""
    if len(body) > PARSE_INLINE_MAX_BYTES:
        return await asyncio.to_thread(parse_request, body, schema)
    return parse_request(body, schema)


def parse_request(body: bytes, schema: type[Schema]) -> Schema:
    """JSON body -> validated request; every problem is a 400 naming the field (OpenAI's `param`)."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None  # the top-level field, as OpenAI reports it
        raise InvalidInput(f"{where}: {first['msg']}" if where else first["msg"], param=param) from None


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` (one of these)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: str | None = None


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(le=TOP_K_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # the request's deadline in seconds, queue and generation included (ladle's extension; see openai_limits)
    timeout: Annotated[float, Field(gt=0.0, le=MAX_TIMEOUT_S, allow_inf_nan=False)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("top_k must be -1 (disabled) or >= 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if longest := max((len(s) for s in stops if len(s) > MAX_STOP_CHARS), default=0):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None, info: ValidationInfo) -> int | None:
        # choice i of n uses seed + i, and each must fit the int64 a torch generator is seeded with
        n = info.data.get("n", 1)
        if value is not None and not -(2**63) <= value <= INT64_MAX - (n - 1):
            raise ValueError(f"seed must be in [-2**63, 2**63 - n] (choice i uses seed + i; n = {n}), got {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            # ASCII digits only, and few of them: str.isdigit() also accepts "²", which int() then refuses
            if not (token.isascii() and token.isdigit() and len(token) <= 10):
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        return value

    def structured(self) -> tuple[StructuredSpec, str] | None:
        """The output constraint asked for, with the field that asked (for error messages); at most one."""
        found = [(spec, param) for spec, param in self._constraints() if spec is not None]
        if len(found) > 1:
            names = ", ".join(param for _, param in found)
            raise InvalidInput(f"ask for one output constraint, not several ({names})", param=found[1][1])
        return found[0] if found else None

    def _constraints(self) -> list[tuple[StructuredSpec | None, str]]:
        so = self.structured_outputs
        return [
            (_response_format_spec(self.response_format), "response_format"),
            (_spec("json", so.json_) if so else None, "structured_outputs"),
            (_spec("regex", so.regex) if so else None, "structured_outputs"),
            (_spec("choice", so.choice) if so else None, "structured_outputs"),
            (_spec("grammar", so.grammar) if so else None, "structured_outputs"),
            (_spec("json", self.guided_json), "guided_json"),
            (_spec("regex", self.guided_regex), "guided_regex"),
            (_spec("choice", self.guided_choice), "guided_choice"),
            (_spec("grammar", self.guided_grammar), "guided_grammar"),
        ]

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple((int(token), float(bias)) for token, bias in (self.logit_bias or {}).items()),
            structured=None if (found := self.structured()) is None else found[0],
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _spec(kind: str, value: Any) -> StructuredSpec | None:
    if value is None:
        return None
    if kind == "choice" or (kind == "json" and not isinstance(value, str)):
        value = orjson.dumps(value).decode()
    return StructuredSpec(kind, value)


def _response_format_spec(fmt: ResponseFormat | None) -> StructuredSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredSpec("json", '{"type": "object"}')
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise InvalidInput("response_format json_schema needs json_schema.schema", param="response_format")
    return StructuredSpec("json", orjson.dumps(fmt.json_schema.json_schema).decode())


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and all(isinstance(p, list) for p in value) and any(not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix is not supported")
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = content or ""
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's field: only with the engine's trust_request_chat_template
    echo: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0
