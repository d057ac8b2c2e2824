"""Structured output: constrain a request's tokens to a JSON schema, a regex, a choice of strings or a Lark grammar.

Each constrained request owns an llguidance matcher. Every step, the rows of constrained requests get a bitmask of
the tokens their grammar allows (llguidance.torch allocates, fills and applies it to the logits before sampling,
like any logits processor), and each sampled token is fed back to its matcher; a grammar that is complete finishes
its request ("stop").
Invariant: a matcher has consumed exactly the request's output tokens (preemption recomputes KV, not tokens).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import types
from collections.abc import Mapping
from typing import Any

import llguidance
import llguidance.hf
import torch

from ladle.errors import InvalidInput
from ladle.llm.sampling_params import StructuredSpec

log = logging.getLogger(__name__)

# JSON whitespace: each gap between JSON tokens may hold one newline and up to JSON_MAX_INDENT spaces or tabs, i.e.
# what a model writes when it pretty-prints ({\n  "name": "Ann",\n  "age": 30\n}), and no more: a model cannot pad
# forever, since every gap needs a JSON token before the next. Measured on the demo model (SmolLM2-135M-Instruct) at
# temperature 1, 180 answers per policy (benchmarks/llm/json_whitespace.py, RESULTS.md), valid / sensible objects:
# compact JSON (ladle's former policy) 70% / 42%, ", " and ": " only 82% / 56%, unbounded whitespace 78% / 61%, this
# 78% / 61% (int4: 77% / 58% vs compact 73% / 44%). Compact pushes the model off the layout it was trained on and it
# derails into odd keys; json_schema answers fit their schema under every policy (~90% sensible), so both share it.
JSON_MAX_INDENT = 16  # depth 4 at 4 spaces per level, 8 at 2
JSON_WHITESPACE = rf"\n?[ \t]{{0,{JSON_MAX_INDENT}}}"
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE}


def grammar_for(spec: StructuredSpec, json_options: Mapping[str, Any] | None = None) -> str:
    """The llguidance grammar for a spec (not yet checked against a tokenizer); `json_options` replaces
    JSON_OPTIONS (benchmarks/llm/json_whitespace.py compares policies with it)."""
    if spec.kind == "json":
        options = dict(JSON_OPTIONS if json_options is None else json_options)
        # overrides, not defaults: a schema's own `x-guidance` must not lift the bound (e.g. whitespace_flexible)
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, overrides=options)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        literals = (json.dumps(choice, ensure_ascii=False) for choice in json.loads(spec.value))
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(literals))
    return llguidance.LLMatcher.grammar_from_lark(spec.value)


class StructuredOutputs:
    """One engine's matchers, keyed by request id, and the per-step bitmask / accept work."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~ms to 1 s)
        self.matchers: dict[str, llguidance.LLMatcher] = {}

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
            _llguidance_torch()  # first use is compile(), on a worker thread: import the bitmask helpers there
        return self._tokenizer

    def compile(self, spec: StructuredSpec, param: str) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`, or a 400 naming `param` when the schema / regex / grammar is invalid.
        Blocking (a complex grammar takes up to ~1 s): call it off the event loop and off the engine thread."""
        try:
            grammar = grammar_for(spec)
        except ValueError as exc:
            raise InvalidInput(f"invalid {spec.kind}: {exc}", param=param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidInput(f"invalid {spec.kind}: {messages[0]}", param=param)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInput(f"invalid {spec.kind}: {matcher.get_error()}", param=param)
        return matcher

    def add(self, request_id: str, matcher: llguidance.LLMatcher) -> None:
        self.matchers[request_id] = matcher

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def bitmask(self, request_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, int32 bitmask [len(rows), words]) for the constrained rows of this step; None when there are none."""
        rows = [i for i, request_id in enumerate(request_ids) if request_id in self.matchers]
        if not rows:
            return None
        llg_torch = _llguidance_torch()
        mask = llg_torch.allocate_token_bitmask(len(rows), self.tokenizer.vocab_size)
        for j, row in enumerate(rows):  # the matcher writes its allowed-token bits straight into row j
            llg_torch.fill_next_token_bitmask(self.matchers[request_ids[row]], mask, j)
        return torch.tensor(rows, dtype=torch.long), mask

    def valid_prefix(self, request_id: str, token_ids: list[int]) -> int:
        """How many leading draft tokens the request's grammar allows (all of them for an unconstrained request)."""
        matcher = self.matchers.get(request_id)
        return len(token_ids) if matcher is None or not token_ids else matcher.validate_tokens(token_ids)

    def bitmask_spec(self, seqs: list[tuple[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """bitmask() for a step verifying draft tokens: each (request id, drafts) has 1 + len(drafts) rows, row j
        masked by the grammar's state after drafts[:j] (consumed, then rolled back)."""
        rows: list[int] = []
        entries: list[tuple[llguidance.LLMatcher, list[int], int]] = []
        row = 0
        for request_id, drafts in seqs:
            matcher = self.matchers.get(request_id)
            if matcher is not None:
                entries.append((matcher, drafts, len(rows)))
                rows.extend(range(row, row + 1 + len(drafts)))
            row += 1 + len(drafts)
        if not rows:
            return None
        llg_torch = _llguidance_torch()
        mask = llg_torch.allocate_token_bitmask(len(rows), self.tokenizer.vocab_size)
        for matcher, drafts, first in entries:
            for j in range(len(drafts) + 1):
                llg_torch.fill_next_token_bitmask(matcher, mask, first + j)
                if j < len(drafts) and not matcher.consume_token(drafts[j]):
                    break  # valid_prefix cut drafts the grammar forbids; a matcher left in error masks nothing more
            matcher.rollback(j)
        return torch.tensor(rows, dtype=torch.long), mask

    def bitmask_after(self, seqs: list[tuple[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """bitmask() with one row per (request id, drafts): the grammar's state after those drafts (a draft
        model's next proposal is kept inside the grammar)."""
        rows = [i for i, (request_id, _) in enumerate(seqs) if request_id in self.matchers]
        if not rows:
            return None
        llg_torch = _llguidance_torch()
        mask = llg_torch.allocate_token_bitmask(len(rows), self.tokenizer.vocab_size)
        for j, row in enumerate(rows):
            request_id, drafts = seqs[row]
            matcher = self.matchers[request_id]
            consumed = sum(1 for _ in itertools.takewhile(matcher.consume_token, drafts))
            llg_torch.fill_next_token_bitmask(matcher, mask, j)
            matcher.rollback(consumed)
        return torch.tensor(rows, dtype=torch.long), mask

    def accept_tokens(self, request_id: str, token_ids: list[int]) -> int | None:
        """Feed a request its emitted tokens, one by one; the count that completed its structured output (the rest
        are dropped), or None when it is not complete (or not constrained)."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return None
        for i, token in enumerate(token_ids):
            if not matcher.consume_token(token):
                log.warning("request %s: structured output rejected token %d: %s", request_id, token,
                            matcher.get_error())
            if matcher.is_stopped() or matcher.is_error():
                return i + 1
        return None

    def accept(self, request_ids: list[str], token_ids: list[int]) -> frozenset[str]:
        """Feed each constrained row its sampled token; the ids whose output is now complete."""
        complete = []
        for request_id, token in zip(request_ids, token_ids, strict=True):
            matcher = self.matchers.get(request_id)
            if matcher is None:
                continue
            if not matcher.consume_token(token):
                log.warning("request %s: structured output rejected token %d: %s", request_id, token,
                            matcher.get_error())
            if matcher.is_stopped() or matcher.is_error():
                complete.append(request_id)
        return frozenset(complete)


@functools.cache
def _llguidance_torch() -> types.ModuleType:
    """llguidance.torch, imported on first use: it imports torch._dynamo (1-2 s), which serving never needs otherwise.
    StructuredOutputs.tokenizer imports it on the compile worker thread, so the engine thread never waits for it."""
    import llguidance.torch

    return llguidance.torch


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the logits of tokens a row's grammar forbids to -inf, in place; other rows are untouched. Bit t % 32 of
    word t // 32 allows token t; tokens past the mask (the model's vocabulary can be padded beyond the tokenizer's)
    are forbidden (llguidance's apply does both)."""
    mask = mask.to(logits.device, non_blocking=True)
    # Rows are distinct and ascending: as many as the batch means all of them, in order (no gather / scatter).
    target = logits if len(rows) == logits.shape[0] else logits[rows]
    # Eager: llguidance's kernel is torch.compile'd, whose first call compiles for ~20 s (on CPU, with a C++
    # compiler that a server may lack) and again for new shapes, all on the engine thread. Eager costs within
    # 7-28% of ladle's former hand-written apply (benchmarks/micro/structured_mask.py, RESULTS.md).
    with torch.compiler.set_stance("force_eager"):
        _llguidance_torch().apply_token_bitmask_inplace(target, mask)
    if target is not logits:
        logits[rows] = target
