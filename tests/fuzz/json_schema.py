"""Valid JSON values for the subset of JSON Schema that pydantic's `model_json_schema()` emits, as hypothesis
strategies: type, enum, const, anyOf, $ref into $defs, properties/required, items, and the numeric, length and
size bounds. (hypothesis-jsonschema 0.23 does not run on current hypothesis, so this small converter stands in.)
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=8))
_ANY_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def from_schema(schema: dict, defs: dict | None = None) -> st.SearchStrategy[Any]:
    """A strategy for values valid under `schema` (`defs`: the root's $defs, for $ref)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind is None:
        return _ANY_JSON
    return _BY_TYPE[kind](schema, defs)


def _integer(schema: dict, defs: dict) -> st.SearchStrategy[int]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = math.floor(schema["exclusiveMinimum"]) + 1
    return st.integers(None if low is None else math.ceil(low), None if high is None else math.floor(high))


def _number(schema: dict, defs: dict) -> st.SearchStrategy[float | int]:
    exclusive = "exclusiveMinimum" in schema
    low = schema["exclusiveMinimum"] if exclusive else schema.get("minimum")
    floats = st.floats(low, schema.get("maximum"), allow_nan=False, allow_infinity=False, exclude_min=exclusive)
    return floats | _integer(schema, defs)  # JSON numbers are integers too


def _string(schema: dict, defs: dict) -> st.SearchStrategy[str]:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True)
    return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 16))


def _array(schema: dict, defs: dict) -> st.SearchStrategy[list]:
    items = from_schema(schema.get("items", {}), defs)
    return st.lists(items, min_size=schema.get("minItems", 0), max_size=schema.get("maxItems", 4))


def _object(schema: dict, defs: dict) -> st.SearchStrategy[dict]:
    properties = schema.get("properties", {})
    if not properties:
        values = schema.get("additionalProperties", {})
        keys = _string(schema.get("propertyNames", {"maxLength": 5}), defs)
        values = _ANY_JSON if values is True else from_schema(values, defs)
        return st.dictionaries(keys, values, max_size=schema.get("maxProperties", 3))
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {name: from_schema(sub, defs) for name, sub in properties.items() if name in required},
        optional={name: from_schema(sub, defs) for name, sub in properties.items() if name not in required},
    )


_BY_TYPE = {
    "integer": _integer,
    "number": _number,
    "string": _string,
    "boolean": lambda schema, defs: st.booleans(),
    "null": lambda schema, defs: st.none(),
    "array": _array,
    "object": _object,
}
