"""Rejection sampling for draft tokens sampled from a draft model's distribution q, against the target's p.

Invariant (Leviathan et al. 2023, Chen et al. 2023): accept draft d with probability min(1, p(d) / q(d)); at the
first rejection emit a token from normalize(max(0, p - q)); when all are accepted, one from p at the next position.
Every emitted token is then distributed exactly as the target model alone would sample it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Draw = Callable[[torch.Tensor, int], int]  # (probabilities [V], position) -> a token drawn from them


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], u: torch.Tensor) -> int:
    """How many leading drafts are accepted: draft j passes when u[j] * q[j, d_j] < p[j, d_j] (u ~ U[0, 1)),
    i.e. with probability min(1, p / q)."""
    s = len(drafts)
    if s == 0:
        return 0
    rows = torch.arange(s, device=p.device)
    tokens = torch.tensor(list(drafts), dtype=torch.long, device=p.device)
    passed = u[:s] * q[rows, tokens] < p[rows, tokens]
    rejected = (~passed).nonzero()
    return s if rejected.numel() == 0 else int(rejected[0, 0])


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], u: torch.Tensor, draw: Draw
                  ) -> tuple[int, int]:
    """p: target probabilities [s + 1, V] at each draft's position and the one after the last; q: the draft's
    [s, V]. Returns (accepted drafts, the token emitted after them)."""
    s = len(drafts)
    accepted = accept_drafts(p, q, drafts, u)
    if accepted == s:
        return s, draw(p[s], s)
    residual = (p[accepted] - q[accepted]).clamp_min_(0.0)
    total = float(residual.sum())
    # p == q exactly leaves no residual mass, but then the draft is never rejected (u * q < p for every u < 1)
    return accepted, draw(residual / total if total > 0.0 else p[accepted], accepted)
