"""Building the speculative engine core at start-up: read the options, measure what steps cost on this host, pick
the drafter. The plain EngineCore is used when speculation is off (DESIGN rule 2: variants chosen once, here).

Invariant: every choice a bad option could make wrong fails here with a message, before the engine serves.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ladle.config import LLMConfig
from ladle.llm.engine import EngineCore
from ladle.llm.spec.engine import Drafter, SpecEngineCore
from ladle.llm.spec.ngram_drafter import NgramDrafter
from ladle.llm.spec.policy import SpecConfig, SpecPolicy, SpecStats, StepCost

if TYPE_CHECKING:
    from ladle.llm.runner import ModelRunner
    from ladle.llm.scheduler import Scheduler
    from ladle.llm.structured import StructuredOutputs
    from ladle.llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PROBE_MAX_SEQS = 64  # beyond, the cost curve is extrapolated along its last (compute-bound) segment


def spec_config(config: LLMConfig) -> SpecConfig | None:
    """The speculation options of an LLMConfig, checked; None when speculation is off."""
    method = config.speculative_method
    if method is None:
        method = "draft_model" if config.speculative_model else "none"
    if method == "none":
        return None
    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    return SpecConfig(
        method, given(config.num_speculative_tokens, 4), given(config.ngram_min, 2), given(config.ngram_max, 4),
        config.speculative_model if method == "draft_model" else None,
    )


def always_speculate() -> bool:
    """LADLE_SPEC_COST=flat: skip the start-up measurement and price every step alike, so the engine always
    speculates (tests that need drafts to happen whatever the box's load; diagnosing the policy)."""
    return os.environ.get("LADLE_SPEC_COST", "") == "flat"


def measure_cost(runner: ModelRunner) -> tuple[StepCost, float]:
    """(seconds per step by tokens fed as single-token decodes, extra seconds per multi-token span), each sequence
    after 256 cached tokens (attention is part of the cost). Verifying k drafts turns a request's decode row into a
    (k + 1)-token span, which attention handles per sequence."""
    if always_speculate():
        return StepCost([(1, 1.0), (2, 1.0)]), 0.0
    runner.time_step(1, 1, repeat=1)  # warm-up: first calls allocate and pick kernels
    points = []
    batch = 1
    while batch <= min(runner.max_num_seqs, PROBE_MAX_SEQS):
        seconds = runner.time_step(batch, 1, repeat=3)
        if seconds is None:
            break
        points.append((batch, seconds))
        batch *= 2
    if len(points) < 3:  # few sequences allowed (--max-num-seqs): the curve comes from one sequence's spans
        for n in (2, 4, 8):
            seconds = runner.time_step(1, n, repeat=3)
            if seconds is not None and n > points[-1][0]:
                points.append((n, seconds))
    cost = StepCost(points or [(1, 1.0)])
    # spans against the same tokens as decodes, at the largest batch probed (attention per span grows with it)
    half = max(1, cost.tokens[-1] // 2)
    spans = runner.time_step(half, 2, repeat=3)
    span_cost = max(0.0, (spans - cost(2 * half)) / half) if spans is not None and half > 1 else 0.0
    # a difference of two timings: noise can inflate it, but one span never costs more than a whole decode step
    return cost, min(span_cost, cost(1))


def build_spec_core(config: LLMConfig, spec: SpecConfig, runner: ModelRunner, scheduler: Scheduler,
                    structured: StructuredOutputs | None, tokenizer: Tokenizer | None = None) -> EngineCore:
    cost, span_cost = measure_cost(runner)
    log.info("speculative decoding (%s, up to %d tokens): step cost by batch %s; +%.2f ms per verified span",
             spec.method, spec.num_speculative_tokens, cost.describe(), span_cost * 1e3)
    drafter: Drafter
    if spec.method == "ngram":
        drafter = NgramDrafter(spec.ngram_min, spec.ngram_max)
        policy = SpecPolicy(spec.num_speculative_tokens, cost, span_cost=span_cost)
    else:
        from ladle.llm.spec.draft_model import DraftModelDrafter

        drafter = DraftModelDrafter.build(config, spec, runner, tokenizer)
        policy = SpecPolicy(spec.num_speculative_tokens, cost, drafter.cost, span_cost=span_cost)
    return SpecEngineCore(runner, scheduler, structured, drafter, policy, SpecStats(spec.num_speculative_tokens))
