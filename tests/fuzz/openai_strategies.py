"""Hypothesis strategies for OpenAI API request bodies, derived from the server's own pydantic request models.

Valid requests come from `model_json_schema()` (tests/fuzz/json_schema.py), with cost-bearing fields (prompt
length, max_tokens, n) tightened so each stays cheap; hostile ones mutate a field into wrong types, huge numbers,
long strings, deep nesting or unknown keys. Bodies are JSON text (`json` allows integers beyond 64 bits).
"""

from __future__ import annotations

import copy
import json

from hypothesis import strategies as st
from pydantic import BaseModel

from ladle.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from tests.fuzz.json_schema import from_schema

MODEL = "tiny"
VOCAB = 512  # the tiny checkpoint's vocabulary (tests/fixtures)
_SHORT = {"type": "string", "maxLength": 24}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": VOCAB - 1}, "minItems": 1,
           "maxItems": 12}
#: fields whose cost grows with their value, bounded so that a valid request takes milliseconds on the tiny model
_CHEAP = {
    "model": {"const": MODEL},
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 4},
    "prompt": {"anyOf": [_SHORT, {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 2}, _TOKENS,
                         {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 2}]},
    "messages": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"enum": ["system", "user", "assistant", "developer", "tool"]},
                       "content": {"anyOf": [_SHORT, {"type": "null"}, {"type": "array", "maxItems": 2, "items": {
                           "type": "object", "required": ["type", "text"],
                           "properties": {"type": {"const": "text"}, "text": _SHORT}}}]},
                       "name": _SHORT}}},
    "stop": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1, "maxLength": 8},
                       {"type": "array", "maxItems": 3, "items": {"type": "string", "minLength": 1, "maxLength": 8}}]},
    "stop_token_ids": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0,
                                                                  "maximum": VOCAB - 1}},
    "logit_bias": {"type": "object", "maxProperties": 3, "propertyNames": {"pattern": "^[0-9]{1,3}$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    # A structured-output constraint is compiled per request; small, valid ones keep that in milliseconds.
    "guided_regex": {"enum": [None, "[a-z]{1,3}", "yes|no"]},
    "guided_choice": {"anyOf": [{"type": "null"}, {"type": "array", "minItems": 1, "maxItems": 3,
                                                   "items": {"type": "string", "minLength": 1, "maxLength": 5}}]},
    "guided_json": {"enum": [None, {"type": "object"}, {"type": "integer"}]},
    "guided_grammar": {"enum": [None, 'start: "a" | "b"']},
    "structured_outputs": {"enum": [None, {"regex": "[0-9]+"}, {"choice": ["x", "y"]}]},
    "response_format": {"enum": [None, {"type": "text"}, {"type": "json_object"}]},
    "chat_template_kwargs": {"enum": [None, {}, {"enable_thinking": False}]},
    "user": _SHORT,
    "suffix": {"type": "null"},
}


def cheap_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with every cost-bearing field bounded (fields it lacks are left out)."""
    schema = copy.deepcopy(model.model_json_schema())
    properties = schema["properties"]
    for name, bounded in _CHEAP.items():
        if name in properties:
            properties[name] = bounded
    schema["required"] = sorted({*schema.get("required", ()), "model"})
    schema["additionalProperties"] = False  # unknown fields come from the mutations, deliberately
    return schema


#: hostile JSON fragments (text: some are not expressible as Python values json would write)
HOSTILE = [
    "null", "true", "0", "-1", "1.5", "1e308", "-1e308", str(2**63), str(2**64), str(2**70), str(-(2**70)),
    '""', '"x"', json.dumps("é" * 2000), json.dumps("stop" * 25_000), '"\\ud800"', "[]", "{}", "[[]]", '[""]',
    str(2**63 - 1), str(-(2**63) - 1), "[null]", json.dumps(list(range(5000))), json.dumps(["a"] * 300),
    "[" * 3000 + "]" * 3000,
    "[" * 500 + "1" + "]" * 500, '{"a":' * 200 + "1" + "}" * 200, json.dumps({str(i): 1 for i in range(2000)}),
    json.dumps([[2**40]]), json.dumps([{"role": "user"}]), json.dumps({"chat_template": "{{ 1 }}"}),
]
_PLACEHOLDER = "\x00hostile\x00"


@st.composite
def bodies(draw: st.DrawFn, valid: st.SearchStrategy[dict], fields: list[str]) -> bytes:
    """A JSON body: a valid request, or one with up to three fields (known or unknown) made hostile."""
    request = draw(valid)
    fragments: list[str] = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        field = draw(st.one_of(st.sampled_from(fields), st.sampled_from(["unknown", "__proto__", "", "stream"])))
        request[field] = _PLACEHOLDER + str(len(fragments))
        fragments.append(draw(st.sampled_from(HOSTILE)))
    text = json.dumps(request, separators=(",", ":"))
    for index, fragment in enumerate(fragments):
        text = text.replace(json.dumps(_PLACEHOLDER + str(index)), fragment)
    if draw(st.integers(0, 29)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # truncated JSON
    return text.encode()


def _valid(model: type[BaseModel]) -> st.SearchStrategy[dict]:
    return from_schema(cheap_schema(model))


completion_bodies = bodies(_valid(CompletionRequest), sorted(CompletionRequest.model_json_schema()["properties"]))
chat_bodies = bodies(_valid(ChatCompletionRequest), sorted(ChatCompletionRequest.model_json_schema()["properties"]))


def describe(body: bytes, limit: int = 2000) -> str:
    """The body for a failure report, shortened in the middle when long."""
    text = body.decode(errors="replace")
    return text if len(text) <= limit else f"{text[: limit // 2]} ... ({len(text)} chars) ... {text[-limit // 2:]}"


#: small valid requests that the sweep mutates one field at a time; n = 2 so that seed + n can overflow
BASES = {
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 2, "n": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "n": 2},
}
SCHEMAS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def sweep(path: str) -> list[bytes]:
    """Every field of the endpoint's request model (and an unknown one) set to every hostile value in turn."""
    fields = [*sorted(SCHEMAS[path].model_json_schema()["properties"]), "unknown_field"]
    bodies: list[bytes] = []
    for field in fields:
        for fragment in HOSTILE:
            request = {**BASES[path], field: _PLACEHOLDER}
            bodies.append(json.dumps(request, separators=(",", ":")).replace(json.dumps(_PLACEHOLDER), fragment)
                          .encode())
    return bodies
