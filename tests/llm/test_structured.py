"""Structured output: the grammar masks (JSON schema, regex, choice, Lark) on a real trained tokenizer, then the
whole engine — constrained requests finish as soon as their output is whole, and leave their unconstrained
neighbours in the batch untouched."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from ladle.config import LLMConfig
from ladle.errors import InvalidInput
from ladle.llm.factory import build_engine
from ladle.llm.sampling_params import SamplingParams, StructuredSpec
from ladle.llm.structured import StructuredOutputs, apply_bitmask
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer

VOCAB = 512
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def walk(outputs: StructuredOutputs, spec: StructuredSpec, seed: int, steps: int = 200) -> list[int]:
    """Sample random logits through the mask until the grammar is complete; the token ids."""
    outputs.add("r", outputs.compile(spec, "param"))
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    try:
        for _ in range(steps):
            logits = torch.randn(1, VOCAB + 8, generator=generator)  # a model vocabulary padded past the tokenizer's
            rows, mask = outputs.bitmask(["r"])
            apply_bitmask(logits, rows, mask)
            assert torch.isinf(logits[0, VOCAB:]).all(), "padding ids are never allowed"
            tokens.append(int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=generator)))
            if outputs.accept(["r"], tokens[-1:]):
                return tokens
        raise AssertionError(f"{spec.kind} not complete after {steps} tokens")
    finally:
        outputs.remove("r")


@pytest.mark.parametrize("seed", range(5))
def test_random_walks_through_the_mask_always_match(hf_tokenizer, seed: int) -> None:
    outputs = StructuredOutputs(hf_tokenizer, VOCAB + 8)
    decode = lambda ids: hf_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    person = json.loads(decode(walk(outputs, StructuredSpec("json", json.dumps(PERSON)), seed)))
    assert set(person) == {"name", "age", "ok"} and 0 <= person["age"] <= 120 and len(person["name"]) <= 6
    by_regex = walk(outputs, StructuredSpec("regex", "[a-c]{2,4}-[0-9]{3}"), seed)
    assert re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", decode(by_regex))
    choices = ["yes", "no", "maybe so"]
    assert decode(walk(outputs, StructuredSpec("choice", json.dumps(choices)), seed)) in choices
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'
    assert re.fullmatch(r"\([0-9](\+[0-9])*\)", decode(walk(outputs, StructuredSpec("grammar", lark), seed)))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (StructuredSpec("regex", "([a-"), "invalid regex"),
        (StructuredSpec("json", '{"type": "nonsense"}'), "invalid json"),
        (StructuredSpec("json", "not json"), "invalid json"),
        (StructuredSpec("grammar", "start: undefined_rule"), "invalid grammar"),
    ],
)
def test_invalid_constraints_are_client_errors(hf_tokenizer, spec: StructuredSpec, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment) as info:
        StructuredOutputs(hf_tokenizer, VOCAB).compile(spec, "guided_x")
    assert info.value.param == "guided_x"


def test_engine_finishes_constrained_requests_and_leaves_neighbours_alone(tmp_path) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    config = LLMConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=256)
    engine = build_engine(config, "tiny", model_dir, None)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    regex_spec = StructuredSpec("regex", "[a-z]{3}-[0-9]{2}")
    regex = SamplingParams(max_tokens=40, temperature=0.9, seed=5, structured=regex_spec)
    schema_spec = StructuredSpec("json", json.dumps(PERSON))
    person = SamplingParams(max_tokens=120, temperature=0.9, seed=6, structured=schema_spec)

    async def run(prompt: list[int], params: SamplingParams) -> tuple[str, str | None]:
        matcher = None if params.structured is None else await engine.compile_structured(params.structured, "x")
        text, reason = "", None
        async for delta in engine.generate(prompt, params, matcher=matcher):
            text, reason = text + delta.text, delta.finish_reason or reason
        return text, reason

    async def main() -> tuple:
        engine.start(asyncio.get_running_loop())
        try:
            alone = await run([5, 6, 7, 8], plain)
            together = await asyncio.gather(run([5, 6, 7, 8], plain), run([9, 10], regex), run([11, 12], person))
            with pytest.raises(ValueError, match="matcher"):
                await anext(engine.generate([1, 2], regex))
            return alone, together
        finally:
            await engine.close()

    alone, (neighbour, by_regex, by_schema) = asyncio.run(main())
    assert neighbour == alone  # masking other rows never touches this one
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", by_regex[0]) and by_regex[1] == "stop"
    assert by_schema[1] == "stop" and set(json.loads(by_schema[0])) == {"name", "age", "ok"}
    assert engine.core.structured.matchers == {}  # dropped with their requests


@pytest.mark.parametrize("constrained", [[1], [0, 2], [0, 1, 2]])
def test_apply_bitmask_masks_only_constrained_rows(constrained: list[int]) -> None:
    """Exactly the forbidden tokens of constrained rows become -inf (and every id past the mask: a model vocabulary
    padded beyond the tokenizer's); unconstrained rows keep their logits bit for bit."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=generator)  # mask covers 64 ids (2 words); ids 64..69 are padding
    mask = torch.randint(-2**31, 2**31 - 1, (len(constrained), 2), dtype=torch.int32, generator=generator)
    masked = logits.clone()
    apply_bitmask(masked, torch.tensor(constrained), mask)
    for row in range(3):
        if row not in constrained:
            assert torch.equal(masked[row], logits[row])
            continue
        words = mask[constrained.index(row)].tolist()
        allowed = [t < 64 and (words[t // 32] >> (t % 32)) & 1 == 1 for t in range(70)]
        assert torch.isinf(masked[row]).tolist() == [not a for a in allowed]
        assert torch.equal(masked[row][torch.tensor(allowed)], logits[row][torch.tensor(allowed)])


def test_a_schema_cannot_lift_the_whitespace_bound() -> None:
    """ladle's JSON options override a client's `x-guidance` (whitespace_flexible would allow unbounded gaps)."""
    from ladle.llm.structured import JSON_WHITESPACE, grammar_for

    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True, "whitespace_pattern": "[ ]*"}}
    grammar = json.loads(grammar_for(StructuredSpec("json", json.dumps(schema))))
    assert grammar["grammars"][0]["json_schema"]["x-guidance"]["whitespace_pattern"] == JSON_WHITESPACE
