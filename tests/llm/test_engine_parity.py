"""The whole engine against Hugging Face transformers: for every architecture, greedy token ids are
identical to `generate` in float32 for prompts of different lengths submitted concurrently through
a block pool small enough to force preemption, and top-5 logprobs match transformers' log-softmax."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from ladle.config import LLMConfig
from ladle.llm.factory import build_engine
from ladle.llm.kernels.ops import gemm_available
from ladle.llm.sampling_params import SamplingParams
from tests.fixtures.checkpoints import ARCHITECTURES, save_tiny_checkpoint

CPU = torch.device("cpu")
MAX_TOKENS = 24
PROMPT_LENGTHS = (3, 9, 17, 30, 33, 48, 64, 70)


def prompts(vocab: int = 500) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_reference(model_dir, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(step[0].float(), -1) for step in out.logits]


async def run_engine(engine, batch: list[list[int]]) -> list[list]:
    engine.start(asyncio.get_running_loop())

    async def one(ids: list[int]) -> list:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
        deltas = [d async for d in engine.generate(ids, params)]
        assert deltas[-1].finish_reason == "length"
        return [(t, lp) for d in deltas for t, lp in zip(d.token_ids, d.logprobs, strict=True)]

    try:
        return await asyncio.gather(*(one(ids) for ids in batch))
    finally:
        await engine.close()


# every architecture eager and torch.compiled through the C++ attention operator (kernels/ops.cpp); the fallbacks
# (the C kernel through ctypes for decodes, and the torch path alone) with a GQA and an MHA model (the attention code is
# the same for all: this keeps the suite's time)
@pytest.mark.parametrize(("arch", "attention", "compiled"), [
    *((a, "operator", False) for a in ARCHITECTURES), *((a, "operator", True) for a in ARCHITECTURES),
    ("llama", "kernel", False), ("gpt2", "kernel", False), ("llama", "gather", False), ("gpt2", "gather", False),
    ("qwen2", "onednn", False)])
def test_greedy_and_logprobs_match_transformers_under_preemption(tmp_path, monkeypatch, arch: str,
                                                                  attention: str, compiled: bool) -> None:
    """attention "onednn": the operator, with oneDNN's GEMMs instead of ladle's (hosts without AVX-512)."""
    monkeypatch.setenv("LADLE_ATTENTION", "operator" if attention == "onednn" else attention)
    monkeypatch.setenv("LADLE_GEMM", "onednn" if attention == "onednn" else "tiled")
    model_dir = save_tiny_checkpoint(tmp_path / arch, arch)
    # 8 blocks of 16 tokens hold one 128-token sequence; eight concurrent requests need ~30: preemption is forced
    config = LLMConfig(model=str(model_dir), dtype="float32", num_kv_blocks=8, block_size=16,
                       max_model_len=128, max_num_batched_tokens=128, enforce_eager=not compiled)
    engine = build_engine(config, arch, model_dir, None)
    runner = engine.core.runner
    if compiled:  # every step on the compiled graphs: wait for the background compile before the first request
        runner.compile_thread.join()
        assert runner.compile_state == "compiled" and runner.model.compiled is not None
    batch = prompts()
    results = asyncio.run(run_engine(engine, batch))
    assert engine.core.scheduler.num_preemptions_total > 0, "the small pool must have forced preemption"
    missing = runner.decode_kernel is None if attention == "kernel" else runner.attention_op is None
    if attention != "gather" and missing:
        pytest.skip("no C/C++ compiler here: the kernel or the operator is not built")
    assert (runner.decode_kernel is not None) == (attention == "kernel")  # the operator includes the kernel
    assert (runner.attention_op is not None) == (attention in ("operator", "onednn"))
    gemms = {type(m).__name__ for m in runner.model.modules()} & {"TiledLinear", "PackedLinear"}
    assert gemms == ({"PackedLinear"} if attention == "onednn" or not gemm_available(torch.float32, CPU)
                     else {"TiledLinear"})
    assert engine.core.scheduler.kv.usage == 0.0
    for prompt, result in zip(batch, results, strict=True):
        expected_tokens, expected_logprobs = hf_reference(model_dir, prompt)
        assert [t for t, _ in result] == expected_tokens
        for (token, lp), ref in zip(result, expected_logprobs, strict=True):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-4)
            top_ref = torch.topk(ref, 5)
            assert [t for t, _ in lp.top] == top_ref.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top_ref.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_logprobs_match_transformers_across_chunks_and_a_warm_prefix_cache(tmp_path, arch: str) -> None:
    """Prompt logprobs (echo + logprobs) score every prompt token once, whether the prompt was prefilled in
    16-token chunks beside other requests or its blocks already sit in the prefix cache."""
    model_dir = save_tiny_checkpoint(tmp_path / arch, arch)
    config = LLMConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=128,
                       max_num_batched_tokens=16)
    engine = build_engine(config, arch, model_dir, None)
    batch = prompts()[3:6]  # 30, 33 and 48 tokens: two to three chunks each
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3)

    async def one(ids: list[int]) -> list:
        deltas = [d async for d in engine.generate(ids, params)]
        return deltas[0].prompt_logprobs

    async def run() -> tuple[list, list]:
        engine.start(asyncio.get_running_loop())
        try:
            cold = await asyncio.gather(*(one(ids) for ids in batch))
            warm = await asyncio.gather(*(one(ids) for ids in batch))  # every full block is now cached
            return cold, warm
        finally:
            await engine.close()

    cold, warm = asyncio.run(run())
    assert engine.core.scheduler.kv.prefix_cache_hits == 0, "scoring a prompt must compute it, not reuse the cache"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, got, again in zip(batch, cold, warm, strict=True):
        assert [r and (r.token_id, [t for t, _ in r.top]) for r in again] == [
            r and (r.token_id, [t for t, _ in r.top]) for r in got]
        assert [r.logprob for r in again[1:]] == pytest.approx([r.logprob for r in got[1:]], abs=1e-5)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        assert got[0] is None and len(got) == len(prompt)
        for pos, row in enumerate(got[1:]):
            token = prompt[pos + 1]
            assert row.token_id == token
            assert row.logprob == pytest.approx(ref[pos, token].item(), abs=1e-4)
            top_ref = torch.topk(ref[pos], 3)
            assert [t for t, _ in row.top] == top_ref.indices.tolist()
