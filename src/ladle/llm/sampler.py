"""Token sampling: a pure function of (logits, SamplingMetadata) -> SamplerOutput; the input logits are never modified.

Invariants: a seeded row's token depends only on its own logits and its own generator's state, never on its
neighbours in the batch; logprobs are those of the raw model logits (before penalties and temperature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from ladle.llm.outputs import SamplerOutput, TokenLogprobs
from ladle.llm.sampler_ops import Seeded, apply_min_p, apply_top_k_top_p, sample_logits, sample_top_k_top_p
from ladle.llm.sampling_params import SamplingParams
from ladle.llm.structured import apply_bitmask

# Temperatures below this are sampled greedily: dividing logits by them can overflow float32.
GREEDY_TEMPERATURE_EPS = 1e-5


_MASK64 = (1 << 64) - 1


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & _MASK64)
    return generator


def token_seed(seed: int, index: int) -> int:
    """The seed of a seeded request's draw for output token `index` (splitmix64 of both): each token's draw depends
    only on (seed, index), never on how many draws came before, so a seeded request samples the same tokens whether
    or not speculative decoding verified several of them in one step, and whatever shares its batch."""
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def is_greedy(params: SamplingParams) -> bool:
    return params.greedy or params.temperature < GREEDY_TEMPERATURE_EPS


@dataclass(frozen=True)
class SamplingRow:
    """One logits row's request state. `generator` is the request's own (see make_generator) or None.

    `eos_token_id` (with params.stop_token_ids) is masked while fewer than params.min_tokens tokens are out.
    `draft_token_ids`: speculative decoding's draft tokens between the output and this row's position; they count
    as output here (penalties, min_tokens), since the row's token is only kept if they are all accepted.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None
    eos_token_id: int | None = None
    draft_token_ids: Sequence[int] = ()

    @property
    def history(self) -> Sequence[int]:
        """The output tokens that precede this row's."""
        return [*self.output_token_ids, *self.draft_token_ids] if self.draft_token_ids else self.output_token_ids


@dataclass(frozen=True)
class Penalties:
    """Per-row penalty columns [N, 1] (None when no row uses that penalty) and the token history they act on,
    flattened to (row index, token id) pairs so each penalty is one gather or index_put over the history."""

    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    seen_rows: torch.Tensor  # prompt + output tokens, for repetition_penalty (HF / vLLM semantics)
    seen_ids: torch.Tensor
    output_rows: torch.Tensor  # generated tokens only, for presence / frequency (OpenAI semantics)
    output_ids: torch.Tensor


def truncates(params: SamplingParams) -> bool:
    """Whether a random row goes through the top-k/top-p/min-p window path (decided by the row alone)."""
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


@dataclass(frozen=True)
class RandomGroup:
    """Random rows that take the same sampling path. Columns [R, 1] are None when every row in the group has the
    neutral value; a neutral entry leaves its row's result bit-identical to having no column at all."""

    rows: torch.Tensor  # batch row indices
    temperature: torch.Tensor | None
    top_k: torch.Tensor | None  # 0 = off
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    seeded: Seeded  # (position in this group, generator)

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], members: list[int], device: str | torch.device
              ) -> RandomGroup | None:
        if not members:
            return None
        params = [rows[i].params for i in members]
        return cls(
            rows=torch.tensor(members, dtype=torch.long, device=device),
            temperature=_column([p.temperature for p in params], 1.0, torch.float32, device),
            top_k=_column([p.top_k for p in params], 0, torch.long, device),
            top_p=_column([p.top_p for p in params], 1.0, torch.float32, device),
            min_p=_column([p.min_p for p in params], 0.0, torch.float32, device),
            seeded=tuple((j, rows[i].generator) for j, i in enumerate(members) if rows[i].generator is not None),
        )

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What `sample` draws from, as probabilities [R, V]."""
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.min_p is not None:
            logits = apply_min_p(logits, self.min_p)
        if self.top_k is not None or self.top_p is not None:
            logits = apply_top_k_top_p(logits, self.top_k, self.top_p)
        return torch.softmax(logits, dim=-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """temperature -> min_p -> top_k/top_p -> draw; row-wise throughout, and never modifies `logits`."""
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.min_p is not None:
            logits = apply_min_p(logits, self.min_p)
        if self.top_k is None and self.top_p is None and self.min_p is None:
            return sample_logits(logits, self.seeded)
        return sample_top_k_top_p(logits, self.top_k, self.top_p, self.seeded)


@dataclass(frozen=True)
class PromptScoring:
    """Prompt positions whose logits follow the sampled rows: each row scores the prompt token after it."""

    request_ids: tuple[str, ...]
    counts: tuple[int, ...]  # rows per request, in row order
    ks: tuple[int, ...]  # top-k alternatives per request
    targets: torch.Tensor  # [rows] the prompt token each row scores


@dataclass(frozen=True)
class SamplingMetadata:
    """Everything `sample` needs for one step, built once from the sampled rows in row order.

    Rows split into greedy rows, random rows without truncation (`plain`) and random rows with top-k/top-p/min-p
    (`truncated`); which group a row joins depends only on its own parameters, so its path never depends on its
    neighbours. Absent features are None, so the common cases skip that work entirely.
    """

    num_rows: int
    greedy_rows: torch.Tensor  # row indices sampled by argmax
    random_groups: tuple[RandomGroup, ...]  # plain and/or truncated
    penalties: Penalties | None
    banned_rows: torch.Tensor | None  # (row, token) pairs masked to -inf: EOS / stop tokens before min_tokens
    banned_ids: torch.Tensor | None
    logprob_rows: torch.Tensor | None  # rows that asked for logprobs
    logprob_ks: tuple[int, ...]  # top-k size per logprob row
    max_logprobs: int
    prompt: PromptScoring | None = None  # prompt logprobs asked for this step
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logit_bias as (rows, token ids, values)
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # structured output: (rows, int32 token bitmask)

    @property
    def all_greedy(self) -> bool:
        return not self.random_groups

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], device: str | torch.device = "cpu",
              prompt: PromptScoring | None = None, allowed: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> SamplingMetadata:
        greedy = [i for i, row in enumerate(rows) if is_greedy(row.params)]
        plain = [i for i, row in enumerate(rows) if not is_greedy(row.params) and not truncates(row.params)]
        truncated = [i for i, row in enumerate(rows) if not is_greedy(row.params) and truncates(row.params)]
        groups = (RandomGroup.build(rows, plain, device), RandomGroup.build(rows, truncated, device))
        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        ks = tuple(rows[i].params.logprobs or 0 for i in logprob_rows)
        banned = _banned_tokens(rows, device)
        return cls(
            num_rows=len(rows),
            greedy_rows=torch.tensor(greedy, dtype=torch.long, device=device),
            random_groups=tuple(g for g in groups if g is not None),
            penalties=_build_penalties(rows, device),
            banned_rows=banned[0] if banned else None,
            banned_ids=banned[1] if banned else None,
            logprob_rows=torch.tensor(logprob_rows, dtype=torch.long, device=device) if logprob_rows else None,
            logprob_ks=ks,
            max_logprobs=max(ks, default=0),
            prompt=prompt,
            bias=_logit_bias(rows, device),
            allowed=allowed,
        )

    @property
    def adjusts_logits(self) -> bool:
        """Whether any row's logits change before sampling (penalties, logit_bias, min_tokens bans)."""
        return self.penalties is not None or self.bias is not None or self.banned_rows is not None


def _column(values: list[float] | list[int], neutral: float, dtype: torch.dtype, device: str | torch.device
            ) -> torch.Tensor | None:
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _flatten(histories: list[tuple[int, Sequence[int]]], device: str | torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, ids) histories -> parallel (row index, token id) tensors, without a per-token Python loop."""
    ids = torch.tensor(list(chain.from_iterable(h for _, h in histories)), dtype=torch.long, device=device)
    row_index = torch.tensor([r for r, _ in histories], dtype=torch.long, device=device)
    lengths = torch.tensor([len(h) for _, h in histories], dtype=torch.long, device=device)
    return torch.repeat_interleave(row_index, lengths), ids


def _build_penalties(rows: Sequence[SamplingRow], device: str | torch.device) -> Penalties | None:
    if not any(row.params.has_penalties for row in rows):
        return None
    params = [row.params for row in rows]
    # Only rows that use a penalty pay for turning their history into tensors.
    seen = [(i, [*r.prompt_token_ids, *r.history]) for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    counted = [(i, r.history) for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    seen_rows, seen_ids = _flatten(seen, device)
    output_rows, output_ids = _flatten(counted, device)
    return Penalties(
        repetition=_column([p.repetition_penalty for p in params], 1.0, torch.float32, device),
        frequency=_column([p.frequency_penalty for p in params], 0.0, torch.float32, device),
        presence=_column([p.presence_penalty for p in params], 0.0, torch.float32, device),
        seen_rows=seen_rows, seen_ids=seen_ids, output_rows=output_rows, output_ids=output_ids,
    )


def _logit_bias(rows: Sequence[SamplingRow], device: str | torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(i, token, bias) for i, row in enumerate(rows) for token, bias in row.params.logit_bias]
    if not entries:
        return None
    row_ids, token_ids, values = zip(*entries, strict=True)
    return (torch.tensor(row_ids, dtype=torch.long, device=device),
            torch.tensor(token_ids, dtype=torch.long, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def _banned_tokens(rows: Sequence[SamplingRow], device: str | torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stop tokens (and EOS unless ignore_eos) for rows that have not yet produced min_tokens tokens."""
    banned: list[tuple[int, Sequence[int]]] = []
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) + len(row.draft_token_ids) >= p.min_tokens:
            continue
        eos = () if p.ignore_eos or row.eos_token_id is None else (row.eos_token_id,)
        if ids := tuple(p.stop_token_ids) + eos:
            banned.append((i, ids))
    return _flatten(banned, device) if banned else None


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """Pick one token per row of `logits` [N, V]: penalties -> greedy argmax | temperature -> min_p -> top_k/top_p
    -> sample. Returns plain Python lists (one .tolist() per result tensor). Rows past meta.num_rows are
    prompt positions to score (meta.prompt), not to sample."""
    logits = logits.float()
    prompt_logprobs = {}
    if meta.prompt is not None:
        prompt_logprobs = score_prompts(logits[meta.num_rows:], meta.prompt)
        logits = logits[: meta.num_rows]
    log_probs = torch.log_softmax(logits[meta.logprob_rows], dim=-1) if meta.logprob_rows is not None else None
    if meta.allowed is not None:  # a copy: the runner's logits are inference tensors, not writable here
        logits = logits.clone()
        apply_bitmask(logits, *meta.allowed)
    if meta.adjusts_logits:
        logits = apply_penalties(logits.clone(), meta)
    tokens = _choose_tokens(logits, meta)
    token_ids = tokens.tolist()
    logprobs = [None] * meta.num_rows if log_probs is None else _logprobs(log_probs, tokens, token_ids, meta)
    return SamplerOutput(token_ids, logprobs, prompt_logprobs)


def probabilities(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution each row's token is drawn from [num_rows, V]: after the grammar mask, penalties, temperature,
    min_p and top-k/top-p; one-hot at the argmax for a greedy row. Speculative decoding's rejection sampling
    compares these for the target and the draft model."""
    logits = logits.float()[: meta.num_rows]
    if meta.allowed is not None:
        logits = logits.clone()
        apply_bitmask(logits, *meta.allowed)
    if meta.adjusts_logits:
        logits = apply_penalties(logits.clone(), meta)
    probs = torch.zeros_like(logits)
    if meta.greedy_rows.numel():
        best = logits[meta.greedy_rows].argmax(dim=-1, keepdim=True)
        probs[meta.greedy_rows] = torch.zeros_like(logits[meta.greedy_rows]).scatter_(-1, best, 1.0)
    for group in meta.random_groups:
        probs[group.rows] = group.probabilities(logits[group.rows])
    return probs


def score_prompts(logits: torch.Tensor, prompt: PromptScoring) -> dict[str, list[TokenLogprobs]]:
    """Each row's raw logprob of the prompt token that follows it, and its top-k, split back per request."""
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, prompt.targets.unsqueeze(1)).squeeze(1).tolist()
    targets = prompt.targets.tolist()
    k = min(max(prompt.ks), log_probs.shape[-1])
    top_lps, top_ids = log_probs.topk(k, dim=-1) if k else (log_probs[:, :0], log_probs[:, :0].long())
    top_lps, top_ids = top_lps.tolist(), top_ids.tolist()
    out, row = {}, 0
    for request_id, count, kk in zip(prompt.request_ids, prompt.counts, prompt.ks, strict=True):
        out[request_id] = [
            TokenLogprobs(targets[i], chosen[i], list(zip(top_ids[i][:kk], top_lps[i][:kk], strict=True)))
            for i in range(row, row + count)
        ]
        row += count
    return out


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties, then logit_bias, then the min_tokens ban; mutates `logits`
    (a copy).

    Works on the (row, token) history pairs only, so the cost grows with the history, not with rows x vocab."""
    pen = meta.penalties
    if pen is not None and pen.repetition is not None:
        rows, ids = pen.seen_rows, pen.seen_ids
        values, penalty = logits[rows, ids], pen.repetition[rows, 0]
        # Dividing a positive logit and multiplying a negative one both make a repeated token less likely.
        # Repeated pairs write the same value, computed from the unpenalised logit, so each token is hit once.
        logits[rows, ids] = torch.where(values > 0, values / penalty, values * penalty)
    if pen is not None and pen.frequency is not None:
        rows, ids = pen.output_rows, pen.output_ids
        logits.index_put_((rows, ids), -pen.frequency[rows, 0], accumulate=True)  # once per occurrence
    if pen is not None and pen.presence is not None:
        vocab = logits.shape[-1]
        pairs = torch.unique(pen.output_rows * vocab + pen.output_ids)  # once per distinct token
        rows, ids = pairs // vocab, pairs % vocab
        logits.index_put_((rows, ids), -pen.presence[rows, 0], accumulate=True)
    if meta.bias is not None:
        rows, ids, values = meta.bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if meta.banned_rows is not None:
        logits[meta.banned_rows, meta.banned_ids] = -math.inf
    return logits


def _choose_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    if len(meta.random_groups) == 1 and meta.greedy_rows.numel() == 0:
        return meta.random_groups[0].sample(logits)  # one group is the whole batch: no gather / scatter
    tokens = torch.empty(meta.num_rows, dtype=torch.long, device=logits.device)
    if meta.greedy_rows.numel():
        tokens[meta.greedy_rows] = logits[meta.greedy_rows].argmax(dim=-1)
    for group in meta.random_groups:
        tokens[group.rows] = group.sample(logits[group.rows])
    return tokens


def _logprobs(log_probs: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], meta: SamplingMetadata
              ) -> list[TokenLogprobs | None]:
    """The sampled token's raw logprob and the row's top-k (best first), for the rows that asked."""
    assert meta.logprob_rows is not None
    chosen_lp = log_probs.gather(-1, tokens[meta.logprob_rows].unsqueeze(1)).squeeze(1).tolist()
    top_ids: list[list[int]] = [[] for _ in meta.logprob_ks]
    top_lps: list[list[float]] = [[] for _ in meta.logprob_ks]
    if meta.max_logprobs > 0:
        values, indices = log_probs.topk(min(meta.max_logprobs, log_probs.shape[-1]), dim=-1)  # sorted
        top_lps, top_ids = values.tolist(), indices.tolist()
    out: list[TokenLogprobs | None] = [None] * meta.num_rows
    for j, (row, k) in enumerate(zip(meta.logprob_rows.tolist(), meta.logprob_ks, strict=True)):
        top = list(zip(top_ids[j][:k], top_lps[j][:k], strict=True))
        out[row] = TokenLogprobs(token_id=token_ids[row], logprob=chosen_lp[j], top=top)
    return out
