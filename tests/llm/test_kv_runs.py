"""An engine built by the factory keeps each request's KV blocks one consecutive run (block_pool.py reservations)
while requests decode side by side and others come and go, and the reservations change no token it generates."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from ladle.config import LLMConfig
from ladle.llm.factory import build_core
from ladle.llm.kv_cache import RESERVE_AHEAD
from ladle.llm.request import Request
from ladle.llm.sampling_params import SamplingParams
from tests.fixtures.checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


def runs(table: list[int]) -> int:
    return 1 + sum(1 for a, b in pairwise(table) if b != a + 1)


def decode_side_by_side(checkpoint, reserve_ahead: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Short requests come and go (fragmenting the pool) while four long ones decode: (tokens, runs per table)."""
    core = build_core(LLMConfig(model=str(checkpoint), dtype="float32", num_kv_blocks=256, max_model_len=256,
                                block_size=4, enforce_eager=True, enable_prefix_caching=False), checkpoint)
    assert core.scheduler.kv.reserve_ahead == RESERVE_AHEAD
    core.scheduler.kv.reserve_ahead = reserve_ahead
    rng = random.Random(3)
    for i in range(6):  # earlier traffic, finished at different steps
        core.add_request(Request(f"s{i}", [rng.randrange(3, 200) for _ in range(rng.randrange(3, 20))],
                                 SamplingParams(max_tokens=rng.randrange(2, 12), temperature=0.0, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(4):
        step()
    for i in range(4):
        core.add_request(Request(f"long{i}", [rng.randrange(3, 200) for _ in range(9)],
                                 SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
    tables: dict[str, int] = {}
    while core.requests:
        for rid in core.requests:
            if rid.startswith("long"):
                tables[rid] = runs(core.scheduler.kv.block_table(rid))
        step()
    return tokens, tables


def test_reservations_keep_runs_and_change_no_token(checkpoint) -> None:
    with_runs, runs_on = decode_side_by_side(checkpoint, RESERVE_AHEAD)
    without, runs_off = decode_side_by_side(checkpoint, 0)
    assert with_runs == without and len(with_runs) == 10 and len(with_runs["long0"]) == 40
    assert all(n == 1 for n in runs_on.values()), runs_on  # 49 tokens: 13 blocks of 4, one run each
    assert sum(runs_off.values()) > 4  # without them the long requests' tables interleave
