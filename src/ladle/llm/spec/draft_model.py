"""The draft-model drafter: a smaller checkpoint sharing the target's tokenizer proposes k tokens autoregressively.

Its KV cache follows the target's: the same block ids, block size and block count, in a tensor of its own, so the
target's block tables serve both (blocks are allocated, rolled back, freed and preempted with the request).
Invariant: `_fed[rid]` records what the draft wrote for a request; at the next step the draft resumes after the
longest prefix of it that is still the request's (accepted drafts keep their K/V, rejected ones are rewritten).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ladle.llm.outputs import SamplerOutput, ScheduledSeq, SchedulerOutput, TokenLogprobs
from ladle.llm.request import Request
from ladle.llm.sampler import SamplingMetadata, SamplingRow, probabilities, token_seed
from ladle.llm.sampler_ops import sample_probs
from ladle.llm.spec.policy import SpecConfig, StepCost
from ladle.llm.spec.rejection import verify_drafts

if TYPE_CHECKING:
    from ladle.config import LLMConfig
    from ladle.llm.runner import ModelRunner
    from ladle.llm.spec.engine import SpecEngineCore
    from ladle.llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# independent random streams of a seeded request, beside the target's own draw (sampler.token_seed)
_DRAFT_STREAM, _ACCEPT_STREAM, _RESIDUAL_STREAM = 0x5D1, 0xACC, 0x7E5


@dataclass
class _Fed:
    """What the draft model wrote for one request: K/V for all_token_ids[:length] + drafts[:-1], before preemption
    number `preemptions` (a preemption frees the blocks, so the draft starts over)."""

    length: int
    drafts: list[int]
    preemptions: int


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner, cost: StepCost, vocab_size: int) -> None:
        self.runner = runner
        self.cost = cost
        self.vocab_size = vocab_size  # the target's: draft distributions are cut or padded to it
        self._fed: dict[str, _Fed] = {}
        self._q: dict[str, torch.Tensor] = {}  # this step's draft distributions [k, V] of sampled requests

    @classmethod
    def build(cls, config: LLMConfig, spec: SpecConfig, target: ModelRunner, tokenizer: Tokenizer | None
              ) -> DraftModelDrafter:
        from ladle.llm.factory import choose_quantization, load_tokenizer, resolve_model_dir
        from ladle.llm.models.loader import open_checkpoint
        from ladle.llm.runner import ModelRunner
        from ladle.llm.spec.setup import always_speculate, measure_cost

        assert spec.model is not None
        path = resolve_model_dir(spec.model)
        checkpoint = open_checkpoint(path)
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(checkpoint), spec.model)
        draft = ModelRunner(
            path, dtype=target.dtype, device=str(target.device), block_size=target.block_size,
            num_blocks=target.num_blocks, max_num_seqs=target.max_num_seqs,
            max_num_batched_tokens=target.max_num_batched_tokens,
            quantization=choose_quantization(config, checkpoint, target.dtype, target.device), checkpoint=checkpoint,
            kv_cache_dtype=target.kv_cache_dtype,
        )
        log.info("draft model %s (%s): %d layers, KV cache %.1f MB beside the target's", path.name,
                 draft.architecture, draft.model.num_layers, draft.num_blocks * draft.bytes_per_block / 1e6)
        cost = StepCost([(1, 0.0), (2, 0.0)]) if always_speculate() else measure_cost(draft)[0]
        return cls(draft, cost, target.vocab_size)

    # ------------------------------------------------------------------ propose
    def propose(self, core: SpecEngineCore, decoding: list[Request], extra_tokens: int) -> None:
        self._q.clear()
        limits = {r.request_id: min(core.max_drafts(r), self.runner.max_model_len - r.num_tokens) for r in decoding}
        chosen = core.policy.choose(len(decoding), limits, extra_tokens)
        kv = core.scheduler.kv
        ks: dict[str, int] = {}
        for request in decoding:
            request.spec_token_ids = []
            k = chosen.get(request.request_id, 0)
            # the draft writes K/V up to the position before its last draft: reserve the blocks now, or skip
            if k and kv.allocate_slots(request, request.num_tokens - request.num_computed_tokens + k - 1):
                ks[request.request_id] = k
        if ks:
            self._run(core, [r for r in decoding if r.request_id in ks], ks)

    def _run(self, core: SpecEngineCore, requests: list[Request], ks: dict[str, int]) -> None:
        """Catch each request's draft K/V up to its last token, then draft k tokens one forward at a time."""
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        logits = self._catch_up(core, requests)
        active = requests
        for depth in range(max(ks.values())):
            if depth:
                logits = self.runner.execute(SchedulerOutput([self._feed(core, r, drafts[r.request_id][-1:],
                                                                         r.num_tokens + depth - 1) for r in active],
                                                             len(active)))
            tokens = self._sample(core, active, drafts, logits)
            for request, token in zip(active, tokens, strict=True):
                drafts[request.request_id].append(token)
            active = [r for r in active if len(drafts[r.request_id]) < ks[r.request_id]]
            if not active:
                break
        for request in requests:
            cut = core.cut_to_grammar(request, drafts[request.request_id])
            request.spec_token_ids = cut
            self._fed[request.request_id] = _Fed(request.num_tokens, cut, request.num_preemptions)
            if request.request_id in self._q:
                self._q[request.request_id] = self._q[request.request_id][: len(cut)]

    def _catch_up(self, core: SpecEngineCore, requests: list[Request]) -> torch.Tensor:
        """Feed each request's tokens the draft has no K/V for (its whole prompt after a preemption or at first),
        in chunks within the step budget; logits of every request's last token, in `requests` order."""
        budget = self.runner.max_num_batched_tokens
        todo = {r.request_id: self._resume_at(r) for r in requests}
        last: dict[str, torch.Tensor] = {}
        while todo:
            seqs, used = [], 0
            for request in requests:
                start = todo.get(request.request_id)
                if start is None or used >= budget:
                    continue
                n = min(request.num_tokens - start, budget - used)
                seqs.append(self._feed(core, request, request.all_token_ids[start : start + n], start,
                                       sample=start + n == request.num_tokens))
                used += n
                if start + n == request.num_tokens:
                    del todo[request.request_id]
                else:
                    todo[request.request_id] = start + n
            rows = self.runner.execute(SchedulerOutput(seqs, used))
            for seq, row in zip([s for s in seqs if s.sample], rows, strict=True):
                last[seq.request_id] = row
        return torch.stack([last[r.request_id] for r in requests])

    def _resume_at(self, request: Request) -> int:
        """The first position whose draft K/V is missing or stale."""
        fed = self._fed.get(request.request_id)
        if fed is None or fed.preemptions != request.num_preemptions:
            return 0
        known = request.all_token_ids
        valid = fed.length
        for token in fed.drafts[:-1]:  # the last draft was proposed, never fed
            if valid >= len(known) or known[valid] != token:
                break
            valid += 1
        return min(valid, request.num_tokens - 1)

    def _feed(self, core: SpecEngineCore, request: Request, token_ids: list[int], start: int,
              sample: bool = True) -> ScheduledSeq:
        return ScheduledSeq(request.request_id, token_ids, start,
                            list(core.scheduler.kv.block_table(request.request_id)), sample)

    def _sample(self, core: SpecEngineCore, requests: list[Request], drafts: dict[str, list[int]],
                logits: torch.Tensor) -> list[int]:
        """One draft token per request from the draft's distribution under the request's own sampling
        parameters (greedy: its argmax); sampled requests keep that distribution (q) for verification."""
        logits = self._to_target_vocab(logits)
        rows = []
        for i, request in enumerate(requests):
            seed = core.seeds.get(request.request_id)
            index = request.num_output_tokens + len(drafts[request.request_id])
            generator = None if seed is None else core.row_generator(i, token_seed(seed ^ _DRAFT_STREAM, index))
            rows.append(SamplingRow(request.sampling_params, request.prompt_token_ids, request.output_token_ids,
                                    generator, request.eos_token_id, drafts[request.request_id]))
        structured = core.structured
        allowed = None
        if structured is not None and structured.matchers:  # proposals stay inside each request's grammar
            allowed = structured.bitmask_after([(r.request_id, drafts[r.request_id]) for r in requests])
        meta = SamplingMetadata.build(rows, self.runner.device, allowed=allowed)
        if meta.all_greedy and allowed is None:
            return logits.argmax(dim=-1).tolist()
        probs = probabilities(logits, meta)
        seeded = tuple((i, row.generator) for i, row in enumerate(rows) if row.generator is not None)
        tokens = sample_probs(probs, seeded).tolist()
        greedy = set(meta.greedy_rows.tolist())
        for i, request in enumerate(requests):
            if i not in greedy:  # a greedy request's q is one-hot: the engine's sample-and-compare verifies it
                q = self._q.get(request.request_id)
                row = probs[i : i + 1]
                self._q[request.request_id] = row if q is None else torch.cat([q, row])
        return tokens

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = self.vocab_size
        if logits.shape[-1] == vocab:
            return logits
        if logits.shape[-1] > vocab:
            return logits[:, :vocab]
        return torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))

    # ------------------------------------------------------------------- verify
    def verify(self, core: SpecEngineCore, logits: torch.Tensor, meta: SamplingMetadata, sched: SchedulerOutput,
               sampled: SamplerOutput) -> SamplerOutput:
        if not self._q:
            return sampled
        targets = probabilities(logits, meta)
        tokens, logprobs = list(sampled.token_ids), list(sampled.logprobs)
        row = 0
        for seq in sched.seqs:
            if not seq.sample:
                continue
            q = self._q.get(seq.request_id)
            if q is not None and seq.num_spec:
                self._rejection_sample(core, seq, targets[row : row + seq.num_rows], q[: seq.num_spec],
                                       logits[row : row + seq.num_rows], row, tokens, logprobs)
            row += seq.num_rows
        return SamplerOutput(tokens, logprobs, sampled.prompt_logprobs, sampled.completed)

    def _rejection_sample(self, core: SpecEngineCore, seq: ScheduledSeq, p: torch.Tensor, q: torch.Tensor,
                          raw: torch.Tensor, row: int, tokens: list[int], logprobs: list) -> None:
        request = core.requests[seq.request_id]
        seed = core.seeds.get(seq.request_id)
        first = request.num_output_tokens
        drafts = seq.spec_token_ids
        if seed is None:
            u = torch.rand(len(drafts), device=p.device)
        else:
            u = torch.stack([torch.rand(1, generator=core.row_generator(row + j, token_seed(
                seed ^ _ACCEPT_STREAM, first + j)), device=p.device)[0] for j in range(len(drafts))])

        def draw(probs: torch.Tensor, position: int) -> int:
            if position == len(drafts):
                return tokens[row + position]  # the bonus position's own sample is already a draw from p
            seeded = () if seed is None else ((0, core.row_generator(row + position, token_seed(
                seed ^ _RESIDUAL_STREAM, first + position))),)
            return int(sample_probs(probs.unsqueeze(0), seeded)[0])

        accepted, token = verify_drafts(p, q, drafts, u, draw)
        emitted = [*drafts[:accepted], token]
        for j, t in enumerate(emitted):
            tokens[row + j] = t
            old = logprobs[row + j]
            if old is not None and old.token_id != t:  # the row's raw logprob of the token it now emits
                lp = float(torch.log_softmax(raw[j].float(), dim=-1)[t])
                logprobs[row + j] = TokenLogprobs(t, lp, old.top)

    def remove(self, request_id: str) -> None:
        self._fed.pop(request_id, None)
        self._q.pop(request_id, None)

    def clear(self) -> None:
        self._fed.clear()
        self._q.clear()


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, where: str) -> None:
    """A draft model must map text to the same token ids as the target, or its proposals are noise. Added special
    tokens may differ (a family's sizes often add a pad token or two); the shared tokens must have the same ids and
    cover nearly all of the target's vocabulary."""
    ours, theirs = target.hf.get_vocab(), draft.hf.get_vocab()
    shared = ours.keys() & theirs.keys()
    moved = sum(ours[t] != theirs[t] for t in shared)
    if moved or len(shared) < 0.98 * len(ours):
        raise ValueError(f"--speculative-model {where}: its tokenizer differs from the model's ({moved} shared tokens "
                         f"with other ids, {len(ours) - len(shared)} of {len(ours)} missing); the draft must share "
                         "the target's vocabulary")
