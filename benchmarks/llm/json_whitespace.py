"""Which JSON whitespace policy gives the most valid, sensible objects from a real small model at temperature 1.

The demo model (SmolLM2-135M-Instruct, examples/models/smollm2, dequantized by default like the issue's vLLM
comparison) answers three chat prompts (two json_object, one json_schema person) under each policy: llguidance JSON
options from compact (ladle's former default) to unbounded whitespace (llguidance's and xgrammar's default). All
requests go to one in-process engine together, so they are decoded in large batches. An answer is
- valid: the grammar finished it within --max-tokens and it parses (and fits the schema, for json_schema);
- sensible: valid, not `{}`, every key a word (KEY below) and every string mostly plain ASCII words or numbers
  (sensible_string).

    .venv/bin/python benchmarks/llm/json_whitespace.py [--seeds 60] [--first-seed 1] [--max-tokens 80]
        [--quantization none] [--policies compact,flexible,...]

Prints markdown (machine, command, tables, one example per failure class) and writes it to
out/json_whitespace.md (and out/json_whitespace.json with every answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llguidance
import torch

from ladle.config import LLMConfig
from ladle.llm.async_engine import AsyncEngine
from ladle.llm.factory import build_engine
from ladle.llm.sampling_params import SamplingParams, StructuredSpec
from ladle.llm.structured import JSON_OPTIONS, grammar_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "out"
DEMO = ROOT / "examples/models/smollm2/1/SmolLM2-135M-Instruct.Q4_1.gguf"

POLICIES: dict[str, dict[str, Any]] = {
    "compact": {"whitespace_flexible": False},  # ladle before this measurement
    "flexible": {"whitespace_flexible": True},  # unbounded: llguidance's default, like xgrammar's any_whitespace
    "separators": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    "ws4": {"whitespace_pattern": r"[ \t\n]{0,4}"},
    "ws16": {"whitespace_pattern": r"[ \t\n]{0,16}"},
    "nl-indent16": {"whitespace_pattern": r"\n?[ \t]{0,16}"},
    "ladle": JSON_OPTIONS,  # whatever structured.py uses now (the chosen policy)
}
DEFAULT_POLICIES = [name for name in POLICIES if name != "ladle"]

PERSON_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
               "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}
JSON_OBJECT = {"type": "object"}  # what the API compiles response_format {"type": "json_object"} to


@dataclass(frozen=True)
class Prompt:
    message: str
    schema: dict[str, Any]


PROMPTS = {
    "person-object": Prompt("Describe a person as a JSON object.", JSON_OBJECT),
    "city-object": Prompt("Give me a JSON object with a city and its country.", JSON_OBJECT),
    "person-schema": Prompt("Describe a person as a JSON object with a name and an age.", PERSON_SCHEMA),
    "city-schema": Prompt("Give me a JSON object with a city and its country.", CITY_SCHEMA),
}
DEFAULT_PROMPTS = ["person-object", "city-object", "person-schema"]

KEY = re.compile(r"^[A-Za-z][A-Za-z _-]{0,30}$")
STRING_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"')
GAP = re.compile(r"[ \t\r\n]+")


@dataclass
class Answer:
    policy: str
    prompt: str
    seed: int | None
    text: str
    finish_reason: str | None
    tokens: int
    verdict: str = ""  # "sensible" or the failure class


def sensible_string(value: str) -> bool:
    """Mostly words: 1-80 characters, at least 80% of them ASCII letters, digits or spaces. "New York",
    "john@example.com", "123 Main St" and numbers written as strings ("30", "2021-05-25") pass; "", "wh...",
    "*****", non-Latin fragments and runaway sentences do not."""
    plain = sum(c.isascii() and (c.isalnum() or c == " ") for c in value)
    return 0 < len(value) <= 80 and plain >= 0.8 * len(value)


def odd_part(value: Any) -> str | None:
    """The first failure class found walking a parsed value: "odd key" or "odd string"; None when all sensible."""
    if isinstance(value, dict):
        if not all(KEY.match(key) for key in value):
            return "odd key"
        return next((odd for v in value.values() if (odd := odd_part(v))), None)
    if isinstance(value, list):
        return next((odd for v in value if (odd := odd_part(v))), None)
    if isinstance(value, str) and not sensible_string(value):
        return "odd string"
    return None


def fits(value: Any, schema: dict[str, Any]) -> bool:
    """A flat schema of PROMPTS by hand: exactly the required keys, each of its type (bool is no JSON integer)."""
    types = {"string": str, "integer": int}
    return isinstance(value, dict) and set(value) == set(schema["required"]) and all(
        isinstance(value[key], types[spec["type"]]) and not isinstance(value[key], bool)
        for key, spec in schema["properties"].items())


def judge(answer: Answer, schema: dict[str, Any]) -> str:
    if answer.finish_reason != "stop":
        return "unfinished"
    try:
        value = json.loads(answer.text)
    except ValueError:
        return "not JSON"
    if schema is not JSON_OBJECT and not fits(value, schema):
        return "misfits schema"
    if not isinstance(value, dict) or not value:
        return "empty {}"
    return odd_part(value) or "sensible"


def longest_gap(text: str) -> int:
    """The longest whitespace run between JSON tokens (string contents removed first)."""
    return max((len(m) for m in GAP.findall(STRING_LITERAL.sub('""', text))), default=0)


def whitespace_chars(text: str) -> int:
    """Characters of whitespace between JSON tokens (string contents removed first)."""
    return sum(len(m) for m in GAP.findall(STRING_LITERAL.sub('""', text)))


async def answer(engine: AsyncEngine, policy: str, name: str, seed: int | None, max_tokens: int) -> Answer:
    prompt = PROMPTS[name]
    spec = StructuredSpec("json", json.dumps(prompt.schema))
    # The policy's own grammar, compiled the way StructuredOutputs.compile does (its options are the only change).
    tokenizer = engine.core.structured.tokenizer
    grammar = grammar_for(spec, POLICIES[policy])
    matcher = await asyncio.to_thread(llguidance.LLMatcher, tokenizer, grammar, log_level=0)
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt.message}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if seed is None else 1.0, seed=seed,
                            structured=spec)
    text, reason, tokens = "", None, 0
    async for delta in engine.generate(ids, params, matcher=matcher):
        text, reason, tokens = text + delta.text, delta.finish_reason or reason, tokens + len(delta.token_ids)
    result = Answer(policy, name, seed, text, reason, tokens)
    result.verdict = judge(result, prompt.schema)
    return result


async def run_all(engine: AsyncEngine, args: argparse.Namespace, seeds: range) -> list[Answer]:
    engine.start(asyncio.get_running_loop())
    try:
        jobs = [answer(engine, policy, prompt, seed, args.max_tokens)
                for policy in args.policies for prompt in args.prompts for seed in [None, *seeds]]
        return await asyncio.gather(*jobs)
    finally:
        await engine.close()


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def summary_table(answers: list[Answer], policies: list[str]) -> list[str]:
    rows = ["| policy | valid % | sensible % | mean output tokens | whitespace chars / valid answer | longest gap |",
            "|---|---|---|---|---|---|"]
    for policy in policies:
        mine = [a for a in answers if a.policy == policy and a.seed is not None]
        valid = [a for a in mine if a.verdict not in ("unfinished", "not JSON", "misfits schema")]
        sensible = sum(a.verdict == "sensible" for a in mine)
        ws = sum(whitespace_chars(a.text) for a in valid) / max(len(valid), 1)
        gap = max((longest_gap(a.text) for a in mine if a.finish_reason == "stop"), default=0)
        tokens = sum(a.tokens for a in mine) / len(mine)
        rows.append(f"| {policy} | {pct(len(valid), len(mine))} | {pct(sensible, len(mine))} | {tokens:.1f} | "
                    f"{ws:.1f} | {gap} |")
    return rows


def per_prompt_table(answers: list[Answer], policies: list[str], prompts: list[str]) -> list[str]:
    rows = ["| policy | " + " | ".join(prompts) + " |", "|---" * (len(prompts) + 1) + "|"]
    for policy in policies:
        cells = []
        for prompt in prompts:
            mine = [a for a in answers if a.policy == policy and a.prompt == prompt and a.seed is not None]
            counts = Counter(a.verdict for a in mine)
            valid = len(mine) - counts["unfinished"] - counts["not JSON"] - counts["misfits schema"]
            cells.append(f"{pct(valid, len(mine))} / {pct(counts['sensible'], len(mine))}")
        rows.append(f"| {policy} | " + " | ".join(cells) + " |")
    return rows


def failure_lines(answers: list[Answer], policies: list[str]) -> list[str]:
    lines = []
    for policy in policies:
        mine = [a for a in answers if a.policy == policy and a.seed is not None]
        counts = Counter(a.verdict for a in mine)
        lines.append(f"- **{policy}**: " + ", ".join(f"{verdict} {n}" for verdict, n in counts.most_common()))
        for verdict in counts:
            if verdict != "sensible":
                example = next(a for a in mine if a.verdict == verdict)
                lines.append(f"  - {verdict} ({example.prompt}, seed {example.seed}): `{example.text[:160]!r}`")
    return lines


def greedy_lines(answers: list[Answer], policies: list[str]) -> list[str]:
    return [f"- {a.policy}, {a.prompt}: {a.verdict}, `{a.text[:160]!r}`"
            for policy in policies for a in answers if a.policy == policy and a.seed is None]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch "
            f"{torch.__version__}, llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else ''}")


def report(answers: list[Answer], args: argparse.Namespace, seconds: float) -> str:
    policies, prompts = args.policies, args.prompts
    n, last_seed = len(prompts) * args.seeds, args.first_seed + args.seeds - 1
    lines = [
        "## JSON whitespace policy (benchmarks/llm/json_whitespace.py)", "",
        f"- Machine: {machine()}",
        f"- Command: `.venv/bin/python {' '.join(sys.argv)}` ({seconds:.0f} s)",
        f"- Model: {DEMO.name}, quantization {args.quantization}; temperature 1, seeds {args.first_seed}-{last_seed} x "
        f"{len(prompts)} prompts = {n} answers per policy, max_tokens {args.max_tokens}",
        "- Prompts (user message; response_format): " + "; ".join(
            f"{p} \"{PROMPTS[p].message}\" `{json.dumps(PROMPTS[p].schema)}`" for p in prompts),
        "- valid: finished by the grammar and parses (json_schema: also fits it); sensible: valid, not `{}`, every key "
        "matches `^[A-Za-z][A-Za-z _-]{0,30}$`, every string 1-80 chars with >= 80% ASCII letters/digits/spaces; "
        "longest gap: the longest whitespace run between tokens in any finished answer",
        "- Policies (llguidance JSON options): " + "; ".join(f"{p} `{json.dumps(POLICIES[p])}`" for p in policies), "",
        *summary_table(answers, policies), "",
        "Per prompt (valid % / sensible %):", "",
        *per_prompt_table(answers, policies, prompts), "",
        "Verdicts, with the first example of each failure:", "",
        *failure_lines(answers, policies), "",
        "Greedy (temperature 0):", "",
        *greedy_lines(answers, policies), "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60, help="sampled answers per prompt and policy (seeds 1..N)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds first..first+N-1 (a second, disjoint sample)")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--quantization", default="none", help="none (dequantized, as in the issue) or auto (int4)")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help="comma-separated names from: " + ", ".join(POLICIES))
    parser.add_argument("--prompts", default=",".join(DEFAULT_PROMPTS),
                        help="comma-separated names from: " + ", ".join(PROMPTS))
    parser.add_argument("--out", default="json_whitespace", help="file stem under out/")
    args = parser.parse_args()
    args.policies, args.prompts = args.policies.split(","), args.prompts.split(",")
    unknown = [name for name in args.policies + args.prompts if name not in POLICIES and name not in PROMPTS]
    if unknown:
        parser.error(f"unknown policies or prompts: {unknown}")
    return args


def main() -> None:
    args = parse_args()
    if not DEMO.exists():
        raise SystemExit(f"{DEMO} is missing: run .venv/bin/python examples/build_demo.py")
    # Room for every request at once (~45 prompt + max_tokens each): one big batch, no preemption.
    requests = len(args.policies) * len(args.prompts) * (args.seeds + 1)
    config = LLMConfig(model=str(DEMO), quantization=args.quantization, max_model_len=2048, max_num_seqs=128,
                       num_kv_blocks=max(256, 128 * (-(-(64 + args.max_tokens) // 16))),
                       max_waiting_requests=requests, max_waiting_tokens=64 * requests)  # all queued at once
    engine = build_engine(config, "demo", DEMO, None)
    started = time.monotonic()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    answers = asyncio.run(run_all(engine, args, seeds))
    text = report(answers, args, time.monotonic() - started)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.md").write_text(text + "\n")
    (OUT / f"{args.out}.json").write_text(json.dumps([asdict(a) for a in answers], indent=1, ensure_ascii=False))
    print(f"{requests} requests; wrote {OUT / (args.out + '.md')}")


if __name__ == "__main__":
    main()
