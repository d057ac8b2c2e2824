"""Rejection sampling is lossless: on a 5-token vocabulary, tokens generated through draft proposals and
verification follow the target's distribution (chi-square over thousands of sequences, fixed seed), and a broken
acceptance rule fails the same test. Also: the sampler's `probabilities` is what `sample` draws from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

import ladle.llm.spec.rejection as rejection
from ladle.llm.sampler import SamplingMetadata, SamplingRow, probabilities, sample
from ladle.llm.sampler_ops import sample_probs
from ladle.llm.sampling_params import SamplingParams

VOCAB = 5
LENGTH = 3  # tokens generated per sequence
SAMPLES = 6000
# A context-free "model" per position: target p and a deliberately different draft q (one token q favours,
# p rarely picks; one p likes and q never proposes), so both acceptance and the residual matter.
P = torch.tensor([[0.05, 0.40, 0.25, 0.20, 0.10], [0.30, 0.05, 0.05, 0.50, 0.10], [0.20, 0.20, 0.20, 0.20, 0.20],
                  [0.10, 0.10, 0.60, 0.10, 0.10]])
Q = torch.tensor([[0.60, 0.10, 0.10, 0.20, 0.00], [0.25, 0.25, 0.25, 0.25, 0.00], [0.90, 0.05, 0.05, 0.00, 0.00],
                  [0.10, 0.10, 0.60, 0.10, 0.10]])


def generate(k: int, generator: torch.Generator) -> tuple[int, ...]:
    """LENGTH tokens by speculative steps: the draft samples up to k tokens from Q, verification keeps a prefix."""
    out: list[int] = []

    def draw(probs: torch.Tensor, position: int) -> int:
        return int(sample_probs(probs.unsqueeze(0), ((0, generator),))[0])

    while len(out) < LENGTH:
        pos = len(out)
        s = min(k, LENGTH - pos)
        drafts = [int(torch.multinomial(Q[pos + j], 1, generator=generator)) for j in range(s)]
        u = torch.rand(s, generator=generator)
        accepted, token = rejection.verify_drafts(P[pos : pos + s + 1], Q[pos : pos + s], drafts, u, draw)
        out += [*drafts[:accepted], token]
    return tuple(out[:LENGTH])


def p_value(k: int, seed: int = 0) -> float:
    """Chi-square p-value of the generated (token 0, token 1, token 2) counts against the product of P's rows."""
    generator = torch.Generator().manual_seed(seed)
    counts = Counter(generate(k, generator) for _ in range(SAMPLES))
    cells = [(a, b, c) for a in range(VOCAB) for b in range(VOCAB) for c in range(VOCAB)]
    expected = torch.tensor([float(P[0, a] * P[1, b] * P[2, c]) for a, b, c in cells]) * SAMPLES
    observed = torch.tensor([float(counts[cell]) for cell in cells])
    keep = expected >= 5  # chi-square needs expected counts of at least ~5 per cell
    observed, expected = observed[keep], expected[keep]
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_generated_sequences_follow_the_target_distribution(k: int) -> None:
    assert p_value(k) > 1e-3


def broken_acceptance(rule: Callable) -> Callable:
    def accept_drafts(p, q, drafts, u):
        rows = torch.arange(len(drafts))
        tokens = torch.tensor(list(drafts), dtype=torch.long)
        passed = rule(u[: len(drafts)], p[rows, tokens], q[rows, tokens])
        rejected = (~passed).nonzero()
        return len(drafts) if rejected.numel() == 0 else int(rejected[0, 0])
    return accept_drafts


@pytest.mark.parametrize("rule", [
    lambda u, p, q: u < p,  # forgets q: over-accepts what the draft proposes too often
    lambda u, p, q: u * p < q,  # p and q swapped
    lambda u, p, q: u < 0.5 * torch.ones_like(p),  # coin flip
])
def test_the_test_fails_a_broken_acceptance_rule(monkeypatch, rule) -> None:
    monkeypatch.setattr(rejection, "accept_drafts", broken_acceptance(rule))
    assert p_value(2) < 1e-6


def test_a_residual_drawn_from_p_instead_of_max_p_minus_q_is_caught(monkeypatch) -> None:
    real = rejection.verify_drafts

    def no_residual(p, q, drafts, u, draw):
        accepted, token = real(p, q, drafts, u, draw)
        return accepted, token if accepted == len(drafts) else draw(p[accepted], accepted)

    monkeypatch.setattr(rejection, "verify_drafts", no_residual)
    assert p_value(2) < 1e-6


def test_probabilities_are_what_sample_draws_from() -> None:
    """Temperature, top-k, top-p, min-p, penalties and greedy rows: the empirical distribution of `sample` matches
    `probabilities` (rejection sampling relies on them being the same distribution)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 8) * 2
    cases = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=4),
             SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1),
             SamplingParams(temperature=0.9, repetition_penalty=1.5, presence_penalty=0.5)]
    for params in cases:
        rows = [SamplingRow(params, [1, 2], [3])] * 4000
        meta = SamplingMetadata.build(rows)
        batch = logits.expand(len(rows), -1)
        probs = probabilities(batch, meta)[0]
        counts = torch.bincount(torch.tensor(sample(batch, meta).token_ids), minlength=8).float()
        torch.testing.assert_close(counts / len(rows), probs, atol=0.03, rtol=0)
        assert counts[probs == 0].sum() == 0  # a token truncation removed is never drawn
    greedy = SamplingMetadata.build([SamplingRow(SamplingParams(temperature=0.0))])
    assert probabilities(logits, greedy)[0].tolist() == torch.nn.functional.one_hot(logits.argmax(), 8).float().tolist()
