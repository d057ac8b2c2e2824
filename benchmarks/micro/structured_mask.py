"""Applying a structured-output bitmask to the logits: llguidance.torch's apply_token_bitmask_inplace (eager, as
ladle runs it) vs ladle's former hand-written apply (kept here only as the reference), and the one-off cost of
llguidance's torch.compile'd kernel on its first call. 49152-token vocabulary (SmolLM's), 1 torch thread,
random masks; median of 30 calls.

    .venv/bin/python benchmarks/micro/structured_mask.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import llguidance.torch as llg_torch
import torch

VOCAB = 49152
_BITS = torch.arange(32, dtype=torch.int32)


def former_apply(logits: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """ladle's apply_bitmask before issue 8."""
    vocab = logits.shape[-1]
    bits = (mask.to(logits.device).unsqueeze(-1) >> _BITS.to(logits.device)) & 1  # [rows, words, 32]
    allowed = bits.view(len(rows), -1)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def median_us(fn: Callable[[], None], n: int = 30) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    print("| rows | former hand-written apply | llguidance apply (eager) |")
    print("|---|---|---|")
    for rows in (1, 8, 64):
        logits = torch.randn(rows, VOCAB)
        mask = torch.randint(-2**31, 2**31 - 1, (rows, (VOCAB + 31) // 32), dtype=torch.int32)
        index = torch.arange(rows)

        def eager(logits: torch.Tensor = logits, mask: torch.Tensor = mask) -> None:
            with torch.compiler.set_stance("force_eager"):
                llg_torch.apply_token_bitmask_inplace(logits, mask)

        former = median_us(lambda logits=logits, mask=mask, index=index: former_apply(logits, index, mask))
        print(f"| {rows} | {former:.0f} µs | {median_us(eager):.0f} µs |", flush=True)
    started = time.perf_counter()
    llg_torch.apply_token_bitmask_inplace(torch.randn(2, VOCAB), llg_torch.allocate_token_bitmask(2, VOCAB))
    print(f"llguidance's compiled kernel, first call (compiles): {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
