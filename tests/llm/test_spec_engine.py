"""Speculative decoding through the whole engine: greedy tokens identical to transformers (and to no speculation)
for every architecture and both drafters under preemption and prefix caching, seeded sampling identical under
n-gram drafts, and every KV block free again after runs full of rejected drafts."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ladle.config import LLMConfig
from ladle.llm.factory import build_engine
from ladle.llm.sampling_params import SamplingParams, StructuredSpec
from ladle.llm.spec.draft_model import DraftModelDrafter
from ladle.llm.spec.policy import StepCost
from tests.fixtures.checkpoints import ARCHITECTURES, save_tiny_checkpoint
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer
from tests.llm.test_engine_parity import hf_reference, prompts

MAX_TOKENS = 24


def perturbed_draft(model_dir: Path, path: Path, noise: float) -> Path:
    """A draft sharing the target's tokenizer: its weights plus noise (0 = the same model, always accepted)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    shutil.copy(model_dir / "generation_config.json", path / "generation_config.json")
    return path


def speculating_engine(model_dir: Path, method: str | None, draft: Path | None = None, **overrides):
    """An engine whose speculation always bets (flat cost curves): the tests exercise verification, not the bet."""
    kw = dict(dtype="float32", num_kv_blocks=8, block_size=16, max_model_len=128, max_num_batched_tokens=128)
    kw.update(overrides)
    config = LLMConfig(model=str(model_dir), speculative_method=method,
                       speculative_model=str(draft) if draft else None, **kw)
    engine = build_engine(config, "m", model_dir, None)
    policy = getattr(engine.core, "policy", None)
    if policy is not None:
        policy.target_cost = StepCost([(1, 1.0), (2, 1.0)])
        policy.span_cost = 0.0
        if policy.draft_cost is not None:
            policy.draft_cost = StepCost([(1, 0.0), (2, 0.0)])
    return engine


async def generate_all(engine, batch: list[list[int]], params: SamplingParams) -> list[list]:
    engine.start(asyncio.get_running_loop())

    async def one(ids: list[int]) -> list:
        deltas = [d async for d in engine.generate(ids, params)]
        return [(t, lp) for d in deltas for t, lp in zip(d.token_ids, d.logprobs, strict=True)]

    try:
        return await asyncio.gather(*(one(ids) for ids in batch))
    finally:
        await engine.close()


def same_with_and_without_speculation(run, model_dir: Path, method: str, draft: Path | None) -> list:
    """`run(engine)`'s results without speculation and with it (some drafts accepted) are equal; the latter."""
    plain = asyncio.run(run(speculating_engine(model_dir, None, num_kv_blocks=32)))
    engine = speculating_engine(model_dir, method, draft, num_kv_blocks=32)
    spec = asyncio.run(run(engine))
    assert spec_counts(engine)[1] > 0
    assert spec == plain
    assert engine.core.structured is None or engine.core.structured.matchers == {}
    return spec


def greedy_params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


def check_against_transformers(model_dir: Path, batch: list[list[int]], results: list[list]) -> None:
    for prompt, result in zip(batch, results, strict=True):
        expected_tokens, expected_logprobs = hf_reference(model_dir, prompt)
        assert [t for t, _ in result] == expected_tokens
        for (token, lp), ref in zip(result, expected_logprobs, strict=True):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-4)  # the target's logprob, not the draft's


def spec_counts(engine) -> tuple[int, int]:
    return engine.core.stats.num_drafted, engine.core.stats.num_accepted


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ngram_greedy_matches_transformers_under_preemption_and_prefix_caching(tmp_path, arch: str) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / arch, arch)
    engine = speculating_engine(model_dir, "ngram", num_kv_blocks=10)
    shared = prompts()[-1][:40]
    batch = [*prompts(), [*shared, 7, 8, 9], [*shared, 10, 11]]  # the last two share cached blocks
    results = asyncio.run(generate_all(engine, batch, greedy_params()))
    drafted, accepted = spec_counts(engine)
    assert drafted > 0 and accepted > 0, "random tiny models loop: n-gram drafts must have been verified"
    assert engine.core.scheduler.num_preemptions_total > 0
    assert engine.core.scheduler.kv.prefix_cache_hits > 0
    assert engine.core.scheduler.kv.usage == 0.0
    engine.core.scheduler.kv.check_invariants()
    check_against_transformers(model_dir, batch, results)


@pytest.mark.parametrize(("arch", "draft_arch"), [("llama", "llama"), ("qwen2", "gpt2"), ("gpt2", "qwen3"),
                                                  ("mistral", "qwen2"), ("qwen3", "mistral")])
def test_draft_model_greedy_matches_transformers_under_preemption(tmp_path, arch: str, draft_arch: str) -> None:
    """A draft of another architecture works as long as it shares the tokenizer; a random one is mostly rejected."""
    model_dir = save_tiny_checkpoint(tmp_path / arch, arch)
    draft = save_tiny_checkpoint(tmp_path / "draft", draft_arch, seed=3)
    engine = speculating_engine(model_dir, None, draft)
    assert isinstance(engine.core.drafter, DraftModelDrafter)
    batch = prompts()
    results = asyncio.run(generate_all(engine, batch, greedy_params()))
    drafted, accepted = spec_counts(engine)
    assert drafted > 100 and accepted < drafted
    assert engine.core.scheduler.num_preemptions_total > 0
    assert engine.core.scheduler.kv.usage == 0.0
    check_against_transformers(model_dir, batch, results)


def test_a_faithful_draft_is_accepted_and_its_kv_follows_the_target(tmp_path) -> None:
    """The same weights as a draft: every draft is accepted, so the draft's own K/V (shared block tables, preempted
    with the request) must stay right through preemption and prefix-cache hits for that to hold."""
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    draft = perturbed_draft(model_dir, tmp_path / "same", noise=0.0)
    engine = speculating_engine(model_dir, "draft_model", draft, num_kv_blocks=12)
    shared = prompts()[-1][:40]
    batch = [*prompts(), [*shared, 7, 8, 9], [*shared, 10, 11]]  # the last two share cached blocks
    results = asyncio.run(generate_all(engine, batch, greedy_params()))
    drafted, accepted = spec_counts(engine)
    assert drafted > 100 and accepted == drafted
    assert engine.core.scheduler.kv.prefix_cache_hits > 0
    assert engine.core.scheduler.num_preemptions_total > 0
    check_against_transformers(model_dir, batch, results)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_changes_nothing_but_speed_for_mixed_requests(tmp_path, method: str) -> None:
    """Greedy with penalties and min_tokens beside seeded top-p sampling, stop tokens and EOS: identical outputs with
    and without speculation (n-gram: the seeded draws are per token; the draft model here is the target itself, so
    its greedy drafts are one-hot proposals)."""
    model_dir = save_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    draft = perturbed_draft(model_dir, tmp_path / "same", noise=0.0) if method == "draft_model" else None
    batch = prompts()[:6]
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3, min_tokens=5, logprobs=2),
        SamplingParams(max_tokens=30, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3, stop_token_ids=[9]),
        SamplingParams(max_tokens=30, temperature=0.0, logit_bias=((12, 3.0),)),
        SamplingParams(max_tokens=30, temperature=0.7, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.3, top_k=5, seed=12, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=30, temperature=0.0),
    ]
    if method == "draft_model":  # sampled requests take rejection sampling with a draft: exact in law, not per seed
        params[3:5] = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)] * 2

    async def run(engine) -> list[list[int]]:
        engine.start(asyncio.get_running_loop())

        async def one(ids: list[int], p: SamplingParams) -> list[int]:
            return [t for d in [d async for d in engine.generate(ids, p)] for t in d.token_ids]

        try:
            return await asyncio.gather(*(one(ids, p) for ids, p in zip(batch, params, strict=True)))
        finally:
            await engine.close()

    same_with_and_without_speculation(run, model_dir, method, draft)


def test_every_block_is_free_after_many_rejections(tmp_path) -> None:
    """A random draft is rejected nearly always: blocks reserved for drafts are rolled back each step, and at the
    end of the run the pool is whole again (ref counts, free queue and tables agree)."""
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    draft = save_tiny_checkpoint(tmp_path / "draft", "llama", seed=5)
    engine = speculating_engine(model_dir, "draft_model", draft, num_kv_blocks=10)
    core = engine.core
    checked: list[int] = []
    step = core.step

    def checked_step():  # the invariants after every step, not only at the end
        outputs = step()
        core.scheduler.kv.check_invariants()
        for request in core.scheduler.running:  # no request keeps blocks past its tokens after a rejection
            table = core.scheduler.kv.block_table(request.request_id)
            assert len(table) <= -(-(request.num_tokens + core.policy.max_tokens) // 16)
        checked.append(1)
        return outputs

    core.step = checked_step
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    asyncio.run(generate_all(engine, prompts(), params))
    drafted, accepted = spec_counts(engine)
    assert drafted > 200 and accepted < drafted // 4
    assert len(checked) > 10
    assert core.scheduler.kv.usage == 0.0
    assert core.scheduler.kv.num_free_blocks == core.scheduler.kv.pool.num_blocks
    core.scheduler.kv.check_invariants()


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_output_under_speculation(tmp_path, method: str) -> None:
    """A grammar that forces repetition (so n-gram drafts exist): drafts it forbids are cut, each verified position
    is masked by the grammar state after the drafts before it, and the output is the one without speculation."""
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    draft = perturbed_draft(model_dir, tmp_path / "same", noise=0.0) if method == "draft_model" else None
    pattern = r"(ab|ba){6}c[0-9]{3}(xyz){3}"
    specs = [StructuredSpec("regex", pattern), StructuredSpec("json", json.dumps(
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 8, "maxItems": 8}))]

    async def run(engine) -> list[tuple[str, str | None]]:
        engine.start(asyncio.get_running_loop())

        async def one(prompt: list[int], spec: StructuredSpec, seed: int | None) -> tuple[str, str | None]:
            params = SamplingParams(max_tokens=80, temperature=0.0 if seed is None else 0.8, seed=seed,
                                    structured=spec)
            matcher = await engine.compile_structured(spec, "x")
            text, reason = "", None
            async for delta in engine.generate(prompt, params, matcher=matcher):
                text, reason = text + delta.text, delta.finish_reason or reason
            return text, reason

        seeds = [None, None] if method == "draft_model" else [None, 4]
        try:
            return await asyncio.gather(*(one([5 + i, 6, 7], spec, seed) for i, spec in enumerate(specs)
                                          for seed in seeds))
        finally:
            await engine.close()

    spec = same_with_and_without_speculation(run, model_dir, method, draft)
    for (text, reason), grammar in zip(spec, [specs[0]] * 2 + [specs[1]] * 2, strict=True):
        assert reason == "stop"
        if grammar.kind == "regex":
            assert re.fullmatch(pattern, text)
        else:
            assert len(json.loads(text)) == 8


def test_drafts_shrink_for_a_request_whose_drafts_are_rejected(tmp_path) -> None:
    """With a step-cost curve where a token more costs 20% of a step, a random draft (nearly always rejected) gets a
    draft while its acceptance estimate is fresh (0.5) and none once it has fallen; a faithful draft's grows to four."""
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    random_draft = save_tiny_checkpoint(tmp_path / "random", "llama", seed=5)
    faithful = perturbed_draft(model_dir, tmp_path / "same", noise=0.0)
    per_step: dict[str, list[int]] = {}
    for name, draft in (("random", random_draft), ("faithful", faithful)):
        engine = speculating_engine(model_dir, "draft_model", draft, num_kv_blocks=32)
        engine.core.policy.target_cost = StepCost([(1, 1.0), (2, 1.2)])
        core, drafted = engine.core, per_step.setdefault(name, [])
        step = core.step

        def counted_step(step=step, core=core, drafted=drafted):
            before = core.stats.num_drafted
            outputs = step()
            drafted.append(core.stats.num_drafted - before)
            return outputs

        core.step = counted_step
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        asyncio.run(generate_all(engine, [prompts()[0]], params))
    random_steps, faithful_steps = per_step["random"], per_step["faithful"]
    assert random_steps[1] == 1 and sum(random_steps[-20:]) == 0, random_steps
    assert faithful_steps[1] == 1 and faithful_steps.count(4) >= 4, faithful_steps
