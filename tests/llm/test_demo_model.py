"""The demo chat model (SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF) through ladle's own model path: it answers
a factual question correctly, full width and as served, and each quantized format agrees with the full-width model
(the GGUF's blocks dequantized, run in float32) on the top-1 token of real text at a stated rate; so does a float32
model decoding over a 16-bit or an 8-bit KV cache (--kv-cache-dtype), token by token through the cache.

Measured here on four chat answers of 64 tokens (256 positions; the test uses three of 48): bfloat16 0.988,
int4 (the Q4_1 blocks repacked as they are, int8-dynamic head) 0.973, int8-weight-only 0.973, int8-dynamic 0.875
(it also quantizes activations, per token).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ladle.config import LLMConfig
from ladle.llm.dtypes import KV_DTYPES
from ladle.llm.factory import build_core, load_tokenizer
from ladle.llm.models import quant
from ladle.llm.models.loader import open_checkpoint
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.runner import ModelRunner
from ladle.llm.tokenizer import Tokenizer
from tests.llm.test_gguf_models import all_position_logits, greedy, runner
from tests.repos import DEMO

DEMO_GGUF = DEMO / "smollm2" / "1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "List three fruits and their colors.",
]
# format -> least top-1 agreement with float32 full width (measured minus a margin for other hosts' kernels)
AGREEMENT = {"none": 0.95, "int4": 0.93, "int8-weight-only": 0.93, "int8-dynamic": 0.8}
# the same by KV-cache dtype, float32 compute, decoding through the cache (measured on five answers of 64 tokens,
# 320 positions: float32 1.000, float16 1.000, bfloat16 0.997; on the test's 144: 8-bit e4m3 (fp8) 0.944, e5m2 0.958)
KV_AGREEMENT = {"float32": 0.99, "float16": 0.98, "bfloat16": 0.97, "fp8": 0.9, "fp8_e5m2": 0.9}

pytestmark = pytest.mark.skipif(
    not DEMO_GGUF.exists(), reason="the demo GGUF is fetched by `python examples/build_demo.py` (make install)"
)



@pytest.fixture(autouse=True)
def int4_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4's correctness is tested on every host; only its speed needs AVX-512 (where `auto` picks it)."""
    monkeypatch.setattr(quant, "int4_capable_cpu", lambda: None)

@pytest.fixture(scope="module")
def tokenizer(demo_repository: Path) -> Tokenizer:
    return load_tokenizer(open_checkpoint(DEMO_GGUF))


def chat(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def reference(tokenizer: Tokenizer) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
    """Each question + the full-width model's greedy answer, the full-width logits at every position, and where
    each answer starts."""
    config = LLMConfig(model=str(DEMO_GGUF), dtype="float32", quantization="none", num_kv_blocks=64,
                       max_model_len=512)
    core = build_core(config, DEMO_GGUF, tokenizer)
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    texts = [p + a for p, a in zip(prompts, greedy(core, prompts, 48), strict=True)]
    assert tokenizer.decode(texts[0][len(prompts[0]):]).startswith("The capital of France is Paris.")
    full = runner(DEMO_GGUF, "none", "float32")
    return texts, [all_position_logits(full, t) for t in texts], [len(p) - 1 for p in prompts]


def test_the_demo_model_as_served_knows_the_capital_of_france(tokenizer: Tokenizer) -> None:
    """The served format (auto: the Q4_1 blocks as int4 here); full width is checked by the `reference` fixture."""
    config = LLMConfig(model=str(DEMO_GGUF), num_kv_blocks=16, max_model_len=256)
    core = build_core(config, DEMO_GGUF, tokenizer)
    assert core.runner.quantization is not None
    [answer] = greedy(core, [chat(tokenizer, QUESTIONS[0])], 12)
    assert tokenizer.decode(answer).startswith("The capital of France is Paris.")


@pytest.mark.parametrize("quantization", list(AGREEMENT))
def test_quantized_formats_agree_with_full_width_on_real_text(reference, quantization: str) -> None:
    texts, full_logits, starts = reference
    model = runner(DEMO_GGUF, quantization, "bfloat16")
    agree = []
    for text, full, start in zip(texts, full_logits, starts, strict=True):
        logits = all_position_logits(model, text)
        agree.append(logits[start:-1].argmax(-1) == full[start:-1].argmax(-1))
    rate = float(torch.cat(agree).float().mean())
    assert rate >= AGREEMENT[quantization], f"{quantization}: top-1 agreement {rate:.3f}"


def decoded_logits(model_runner: ModelRunner, text: list[int], start: int) -> torch.Tensor:
    """Logits at positions [start, len(text) - 1): text[:start + 1] prefilled, then one decode step per token, each
    attending over the K/V the cache holds (where a 16-bit cache's rounding shows; a prefill attends over its own)."""
    blocks = list(range(-(-len(text) // 16)))[::-1]  # scattered order
    rows = []
    with torch.inference_mode():
        feed, pos = text[: start + 1], 0
        while pos < len(text) - 1:
            step = SchedulerOutput([ScheduledSeq("r", feed, pos, blocks, True)], len(feed))
            rows.append(model_runner.execute(step)[0])
            pos += len(feed)
            feed = [text[pos]]
    return torch.stack(rows)


def decoded_agreement(model_runner: ModelRunner, reference) -> float:
    """Top-1 agreement with the full-width model over every answer position, decoded through the cache."""
    texts, full_logits, starts = reference
    agree = [decoded_logits(model_runner, text, start).argmax(-1) == full[start:-1].argmax(-1)
             for text, full, start in zip(texts, full_logits, starts, strict=True)]
    return float(torch.cat(agree).float().mean())


@pytest.mark.parametrize("kv_cache_dtype", list(KV_AGREEMENT))
def test_a_16_bit_kv_cache_agrees_with_full_width_on_real_text(reference, kv_cache_dtype: str) -> None:
    model = ModelRunner(DEMO_GGUF, torch.float32, "cpu", 16, 16, None, 4, 512,
                        checkpoint=open_checkpoint(DEMO_GGUF), kv_cache_dtype=KV_DTYPES[kv_cache_dtype])
    rate = decoded_agreement(model, reference)
    assert rate >= KV_AGREEMENT[kv_cache_dtype], f"{kv_cache_dtype} cache: top-1 agreement {rate:.3f}"


def test_int8_over_its_default_float16_cache_agrees_with_full_width_on_real_text(reference) -> None:
    """`--quantization int8` on a CPU computing in float32 takes a float16 KV cache by default (dtypes.py): the two
    roundings together, decoding token by token through the cache, against the full-width float32 model."""
    config = LLMConfig(model=str(DEMO_GGUF), dtype="float32", quantization="int8-weight-only", num_kv_blocks=16,
                       max_model_len=256, enforce_eager=True)
    model = build_core(config, DEMO_GGUF).runner
    assert model.kv_cache_dtype == torch.float16
    rate = decoded_agreement(model, reference)  # measured 0.986 over 144 positions
    assert rate >= AGREEMENT["int8-weight-only"], f"int8 over a float16 cache: top-1 agreement {rate:.3f}"
