"""The sampler's tensor kernels: min-p, top-k/top-p truncation and the inverse-transform draw of a token.

Invariant: every op is row-wise, and which path a row takes depends only on that row's own logits and parameters,
so a seeded row draws the same token whatever else is in the batch. Nothing here modifies its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Top-k/top-p first look at the best TOP_WINDOW tokens (a cheap topk); only rows whose kept set may reach past the
# window fall back to a full sort, which costs ~15x more on CPU for a 32k vocabulary.
TOP_WINDOW = 256

Seeded = tuple[tuple[int, torch.Generator], ...]  # (row position, that row's generator)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob; in log space that is logit < max logit + log(min_p), so no
    softmax is needed (min_p = 0 gives a -inf threshold, which drops nothing)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def truncate_in_window(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                       window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply top-k (0 = off; ties with the k-th logit kept) then top-p (drop a token once the tokens above it hold
    >= top_p of the mass) to the best `window` tokens of each row.

    Returns (values best-first with dropped ones at -inf, their token ids, resolved[R]): a resolved row provably
    keeps no token outside the window; the others must be redone with window = vocab (a full sort)."""
    vocab = logits.shape[-1]
    window = min(window, vocab)
    if window == vocab:
        values, ids = logits.sort(dim=-1, descending=True)
    else:
        values, ids = logits.topk(window, dim=-1)
    # Values are sorted, so a window ending in -inf (e.g. after min_p) already holds every candidate.
    resolved = (values[:, -1] == -math.inf) | (window == vocab)
    k_off = torch.ones_like(resolved)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab)
        k_off = (k >= vocab).squeeze(1)
        values, by_k = _window_top_k(values, k)
        resolved = resolved | by_k
    if top_p is not None:
        values, by_p = _window_top_p(values, logits, top_p, resolved)
        # Mass beyond the window is only known for rows without a top-k cut (it is then the whole row's).
        resolved = resolved | (by_p & k_off)
    return values, ids, resolved


def _window_top_k(values: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    window = values.shape[-1]
    kth = values.gather(-1, k.clamp(max=window) - 1)
    cut = k < window  # strictly inside, so the window's last value shows whether ties with the k-th spill past it
    resolved = (cut & (values[:, -1:] < kth)).squeeze(1)
    return values.masked_fill(cut & (values < kth), -math.inf), resolved


def _window_top_p(values: torch.Tensor, logits: torch.Tensor, top_p: torch.Tensor, resolved: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # Resolved rows hold their whole distribution in the window; the others are normalised over the full row.
    lse = values.logsumexp(dim=-1, keepdim=True)
    if not bool(resolved.all()):
        lse = torch.where(resolved.unsqueeze(1), lse, logits.logsumexp(dim=-1, keepdim=True))
    probs = (values - lse).exp()
    mass_above = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    # Never the best token (its mass_above is 0 and top_p > 0); never any token when top_p = 1, where rounding in
    # the cumsum could otherwise drop the tail and make the row's result depend on whether a neighbour has top_p.
    drop = (mass_above >= top_p) & (top_p < 1.0)
    return values.masked_fill(drop, -math.inf), drop[:, -1]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
                      ) -> torch.Tensor:
    """Full-vocabulary top-k/top-p mask (dropped tokens at -inf), the reference for the windowed fast path."""
    values, ids, _ = truncate_in_window(logits, top_k, top_p, window=logits.shape[-1])
    return torch.full_like(logits, -math.inf).scatter_(-1, ids, values)


def sample_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                       seeded: Seeded) -> torch.Tensor:
    """Sample each row among the tokens top-k/top-p keep: from the window when it provably holds them all,
    otherwise after a full sort."""
    values, ids, resolved = truncate_in_window(logits, top_k, top_p, TOP_WINDOW)
    flags = resolved.tolist()
    if all(flags):
        return ids.gather(-1, sample_logits(values, seeded).unsqueeze(1)).squeeze(1)
    inside = [i for i, ok in enumerate(flags) if ok]
    outside = [i for i, ok in enumerate(flags) if not ok]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if inside:
        chosen = sample_logits(values[inside], _subset(seeded, inside))
        tokens[inside] = ids[inside].gather(-1, chosen.unsqueeze(1)).squeeze(1)
    values, ids, _ = truncate_in_window(logits[outside], _rows(top_k, outside), _rows(top_p, outside),
                                        window=logits.shape[-1])
    chosen = sample_logits(values, _subset(seeded, outside))
    tokens[outside] = ids.gather(-1, chosen.unsqueeze(1)).squeeze(1)
    return tokens


def _rows(column: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    return None if column is None else column[rows]


def _subset(seeded: Seeded, rows: list[int]) -> Seeded:
    """Re-number seeded positions for the sub-batch made of `rows`."""
    position = {row: j for j, row in enumerate(rows)}
    return tuple((position[row], gen) for row, gen in seeded if row in position)


def sample_logits(logits: torch.Tensor, seeded: Seeded) -> torch.Tensor:
    """One token index per row, drawn from softmax(logits) (see sample_probs)."""
    return sample_probs(torch.softmax(logits, dim=-1), seeded)


def sample_probs(probs: torch.Tensor, seeded: Seeded) -> torch.Tensor:
    """One token index per row, token i with probability probs[i] / sum(probs) (non-negative weights), by inverse
    transform: u ~ U[0, 1) times the row's total, located in its running sum. One uniform per row: the exponential
    race this replaces (argmax p / Exp(1)) drew one per vocabulary entry, and torch's CPU generator is serial: 10-15 ms
    of a 32-row step over 49k tokens, against ~3 ms (benchmarks/RESULTS.md). Unseeded rows share one batched draw;
    each seeded row draws its u from its own generator. Tokens of probability 0 are never drawn (their running sum
    equals their predecessor's, and the search takes the first entry above u)."""
    rows, vocab = probs.shape
    cdf = probs.cumsum(dim=-1)  # torch accumulates float32 running sums in double on the CPU
    u = torch.empty(rows, 1, dtype=cdf.dtype, device=cdf.device)
    if len(seeded) < rows:
        u.uniform_()
    for position, generator in seeded:
        u[position].uniform_(generator=generator)
    tokens = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).squeeze(1)
    over = tokens >= vocab  # u x total rounded up to the total: the row's last token of nonzero probability
    if bool(over.any()):
        last = vocab - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
        tokens = torch.where(over, last, tokens)
    return tokens
