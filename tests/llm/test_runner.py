"""ModelRunner driven step by step by a hand-written scheduler stand-in, against transformers' greedy generate."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.runner import ModelRunner
from tests.fixtures.tiny_llm import TINY_EOS_ID, VARIANTS, save_tiny_model

ARCH_CASES = {name: case for name, case in VARIANTS.items() if name != "mistral"}  # mistral == llama here
PROMPTS = [[5, 9, 13], list(range(20, 61)), [7], [100 + 3 * i for i in range(19)]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(root / name, arch, **kw) for name, (arch, kw) in ARCH_CASES.items()}


def make_runner(path: Path, block_size: int = 16, dtype: torch.dtype = torch.float32, **kw: int) -> ModelRunner:
    kw.setdefault("num_blocks", 64)
    return ModelRunner(path, dtype, "cpu", block_size, kw.pop("num_blocks"), None, 16, 512, **kw)


@dataclass
class _Seq:
    rid: str
    tokens: list[int]
    arrival: int
    prompt_len: int
    computed: int = 0
    blocks: list[int] = field(default_factory=list)


class Driver:
    """Plays the scheduler: requests arrive at given steps, prompts are fed `chunk` tokens at a time, blocks come
    from a free list (shuffled when `shuffle_seed` is set), and every scheduled sequence runs in one batch."""

    def __init__(self, runner: ModelRunner, chunk: int = 10_000, shuffle_seed: int | None = None) -> None:
        self.runner, self.chunk = runner, chunk
        self.free = list(range(runner.num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.free)

    def schedule(self, seqs: list[_Seq], step: int, max_new: int) -> SchedulerOutput:
        scheduled = []
        for s in seqs:
            if s.arrival > step or len(s.tokens) - s.prompt_len >= max_new:
                continue
            n = min(self.chunk, len(s.tokens) - s.computed)
            while len(s.blocks) * self.runner.block_size < s.computed + n:
                s.blocks.append(self.free.pop())
            feed = s.tokens[s.computed : s.computed + n]
            scheduled.append(ScheduledSeq(s.rid, feed, s.computed, list(s.blocks), s.computed + n == len(s.tokens)))
            s.computed += n
        return SchedulerOutput(scheduled, sum(x.num_tokens for x in scheduled))

    def generate(self, prompts: list[list[int]], max_new: int, stagger: int = 0) -> list[list[int]]:
        seqs = [_Seq(str(i), list(p), i * stagger, len(p)) for i, p in enumerate(prompts)]
        by_id = {s.rid: s for s in seqs}
        step = 0
        while any(len(s.tokens) - s.prompt_len < max_new for s in seqs):
            sched = self.schedule(seqs, step, max_new)
            if not sched.empty:
                logits = self.runner.execute(sched)
                assert logits.shape == (len(sched.sampled_ids), self.runner.vocab_size)
                for rid, row in zip(sched.sampled_ids, logits, strict=True):
                    by_id[rid].tokens.append(int(row.argmax()))
            step += 1
        return [s.tokens[s.prompt_len :] for s in seqs]


def hf_greedy(path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # both sides decode exactly max_new tokens
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt) :].tolist())
    return outs


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_batched_greedy_matches_transformers_generate(model_dirs: dict[str, Path], case: str) -> None:
    expected = hf_greedy(model_dirs[case], PROMPTS, 12)
    # Staggered arrivals and 16-token chunks mix prefills, prefill chunks and decodes in the same steps.
    got = Driver(make_runner(model_dirs[case]), chunk=16, shuffle_seed=1).generate(PROMPTS, 12, stagger=2)
    assert got == expected


@pytest.mark.parametrize("block_size", [16, 5])
def test_block_size_and_shuffled_blocks_do_not_change_tokens(model_dirs: dict[str, Path], block_size: int) -> None:
    baseline = Driver(make_runner(model_dirs["llama"])).generate(PROMPTS, 8)
    runner = make_runner(model_dirs["llama"], block_size=block_size, num_blocks=200)
    assert Driver(runner, chunk=7, shuffle_seed=3).generate(PROMPTS, 8, stagger=1) == baseline


def _prefill_logits(runner: ModelRunner, prompt: list[int], chunk: int, blocks: list[int]) -> torch.Tensor:
    """Feed the prompt in chunks (start_pos > 0 after the first) and return the logits of its last token."""
    for start in range(0, len(prompt), chunk):
        end = min(start + chunk, len(prompt))
        seq = ScheduledSeq("r", prompt[start:end], start, blocks, end == len(prompt))
        logits = runner.execute(SchedulerOutput([seq], end - start))
    return logits[0]


@pytest.mark.parametrize("case", ["llama", "qwen3", "gpt2"])
def test_chunked_prefill_equals_full_prefill(model_dirs: dict[str, Path], case: str) -> None:
    runner = make_runner(model_dirs[case], block_size=8)
    prompt = [(7 * i + 3) % 500 for i in range(45)]
    blocks = [40, 3, 17, 9, 22, 5]  # non-contiguous, unordered
    full = _prefill_logits(runner, prompt, 1000, blocks)
    for chunk in (16, 13, 1):
        torch.testing.assert_close(_prefill_logits(runner, prompt, chunk, blocks), full, atol=1e-4, rtol=1e-4)


def test_logit_rows_follow_sampled_ids_order(model_dirs: dict[str, Path]) -> None:
    runner = make_runner(model_dirs["llama"])
    singles = {
        rid: runner.execute(SchedulerOutput([ScheduledSeq(rid, p, 0, [b], True)], len(p)))[0]
        for rid, p, b in [("a", [4, 5, 6], 1), ("c", [9], 3)]
    }
    # The runner regroups decodes first internally; a prefill chunk that does not sample returns no row.
    seqs = [
        ScheduledSeq("a", [4, 5, 6], 0, [1], True),
        ScheduledSeq("b", [7, 8, 9, 10], 0, [2], False),
        ScheduledSeq("c", [9], 0, [3], True),
    ]
    logits = runner.execute(SchedulerOutput(seqs, 8))
    assert logits.dtype == torch.float32 and logits.shape == (2, runner.vocab_size)
    torch.testing.assert_close(logits[0], singles["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], singles["c"], atol=1e-5, rtol=1e-5)
    assert runner.execute(SchedulerOutput([], 0)).shape == (0, runner.vocab_size)


def test_runner_properties_and_kv_budget(model_dirs: dict[str, Path]) -> None:
    runner = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 16, None, 1 << 20, 8, 256)
    # 2 layers * (k, v) * 16 tokens * 2 kv heads * 16 dims * 4 bytes = 8 KiB per block
    assert runner.bytes_per_block == 8192 and runner.num_blocks == (1 << 20) // 8192
    assert runner.max_model_len == 512 and runner.vocab_size == 512
    assert runner.eos_token_ids == [TINY_EOS_ID] and runner.architecture == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="num_blocks or kv_cache_memory"):
        ModelRunner(model_dirs["llama"], torch.float32, "cpu", 16, None, None, 8, 256)


def test_invalid_batches_are_refused(model_dirs: dict[str, Path]) -> None:
    runner = make_runner(model_dirs["llama"], block_size=4, num_blocks=8)
    bad = {
        "block tables too short": ScheduledSeq("a", [1] * 5, 0, [1], True),
        r"block ids must be in \[0, 8\)": ScheduledSeq("a", [1] * 3, 0, [8], True),
        "exceeds max_model_len": ScheduledSeq("a", [1], 512, list(range(8)) * 17, True),
    }
    for message, seq in bad.items():
        with pytest.raises(ValueError, match=message):
            runner.execute(SchedulerOutput([seq], seq.num_tokens))


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_kv_cache_holds_twice_the_tokens_and_keeps_the_tokens(model_dirs: dict[str, Path],
                                                                       cache_dtype: torch.dtype) -> None:
    """--kv-cache-dtype under a float32 model: half the bytes per block, K/V stored rounded, attention in float32."""
    runner = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 16, None, 1 << 20, 16, 512,
                         kv_cache_dtype=cache_dtype)
    assert runner.kv_cache.dtype == cache_dtype and runner.bytes_per_block == 4096
    assert runner.num_blocks == (1 << 20) // 4096  # twice the float32 cache's blocks in the same memory
    assert runner.graph_description()["kv_cache_dtype"] == str(cache_dtype)  # compiled graphs are kept apart
    assert Driver(runner, chunk=16, shuffle_seed=1).generate(PROMPTS, 12, stagger=2) == hf_greedy(
        model_dirs["llama"], PROMPTS, 12)
    # a prompt read back from the cache chunk by chunk: logits within the cache's rounding of the float32 ones
    prompt, blocks = [(7 * i + 3) % 500 for i in range(45)], [40, 3, 17, 9, 22, 5]
    full = _prefill_logits(make_runner(model_dirs["llama"], block_size=8), prompt, 1000, blocks)
    narrow = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 8, 64, None, 16, 512, kv_cache_dtype=cache_dtype)
    chunked = _prefill_logits(narrow, prompt, 13, blocks)
    tolerance = 2e-2 if cache_dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(chunked, full, atol=tolerance, rtol=tolerance)
    assert not torch.allclose(chunked, full, atol=1e-6, rtol=0)  # the cache really is narrower


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_an_8_bit_kv_cache_holds_four_times_the_tokens_within_its_rounding(model_dirs: dict[str, Path],
                                                                          cache_dtype: torch.dtype) -> None:
    """--kv-cache-dtype fp8 / fp8_e5m2 under a float32 model: a quarter of the bytes per block; the prompt's logits read
    back from the cache chunk by chunk stay within the 8-bit rounding of the float32 cache's (e4m3 keeps a mantissa
    bit more than e5m2), and generation runs through the decode kernel to the requested length."""
    runner = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 16, None, 1 << 20, 16, 512,
                         kv_cache_dtype=cache_dtype)
    assert runner.kv_cache.dtype == cache_dtype and runner.bytes_per_block == 2048
    assert runner.num_blocks == (1 << 20) // 2048  # four times the float32 cache's blocks in the same memory
    tokens = Driver(runner, chunk=16, shuffle_seed=1).generate(PROMPTS, 12, stagger=2)
    assert [len(t) for t in tokens] == [12] * len(PROMPTS)
    prompt, blocks = [(7 * i + 3) % 500 for i in range(45)], [40, 3, 17, 9, 22, 5]
    full = _prefill_logits(make_runner(model_dirs["llama"], block_size=8), prompt, 1000, blocks)
    narrow = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 8, 64, None, 16, 512, kv_cache_dtype=cache_dtype)
    chunked = _prefill_logits(narrow, prompt, 13, blocks)
    error = (chunked - full).abs().max().item()  # measured 0.09 (e4m3) and 0.18 (e5m2) on logits of magnitude ~2.3
    assert torch.isfinite(chunked).all() and 1e-6 < error < (0.2 if cache_dtype == torch.float8_e4m3fn else 0.4)


def test_each_layer_binds_its_cache_as_a_tensor_of_its_own_over_the_one_allocation(model_dirs: dict[str, Path]
                                                                                    ) -> None:
    """Storage offset 0 for every layer's K and V (a view's offset becomes a compiled graph input, read and passed on
    every call), the memory still the runner's one KV allocation."""
    runner = make_runner(model_dirs["llama"], block_size=8)
    for i, layer in enumerate(runner.model.layers):
        for j, cache in enumerate((layer.self_attn.k_cache, layer.self_attn.v_cache)):
            assert cache.storage_offset() == 0
            assert cache.data_ptr() == runner.kv_cache[i, j].data_ptr() and cache.shape == runner.kv_cache[i, j].shape
    runner.kv_cache[1, 0].fill_(3.0)
    assert bool((runner.model.layers[1].self_attn.k_cache == 3.0).all())
