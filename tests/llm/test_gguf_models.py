"""GGUF checkpoints and quantized weights through the whole model path (loader, runner, engine steps):

- a tiny Llama / Mistral / Qwen2 / Qwen3 written to GGUF at F32 gives the safetensors original's logits and greedy
  tokens; at Q8_0 (read full width) it equals a safetensors checkpoint holding the dequantized weights;
- every quantization scheme stays within a stated distance of full width on every architecture, and a Q4_1 GGUF
  repacked to int4 stays within bf16 rounding of its own dequantized weights;
- `--dtype auto` follows the CPU's native bf16 support.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ladle.config import LLMConfig
from ladle.llm import dtypes
from ladle.llm.engine import EngineCore
from ladle.llm.factory import build_core, choose_quantization, load_tokenizer
from ladle.llm.models import quant
from ladle.llm.models.linear import TiledLinear, tiled_gemm_runs
from ladle.llm.models.loader import open_checkpoint
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.request import Request
from ladle.llm.runner import ModelRunner
from ladle.llm.sampling_params import SamplingParams
from tests.fixtures.tiny_gguf import save_tiny_gguf
from tests.fixtures.tiny_llm import VARIANTS, save_tiny_model
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer

PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (5, 23, 40)]
LONG_PROMPT = [(11 * i + 5) % 509 for i in range(70)]
GGUF_VARIANTS = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3")



@pytest.fixture(autouse=True)
def int4_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4's correctness is tested on every host; only its speed needs AVX-512 (where `auto` picks it)."""
    monkeypatch.setattr(quant, "int4_capable_cpu", lambda: None)

def hf_dir(root: Path, variant: str) -> Path:
    arch, overrides = VARIANTS[variant]
    path = save_tiny_model(root / variant, arch, **overrides)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-models")


def runner(path: Path, quantization: str = "none", dtype: str = "float32") -> ModelRunner:
    checkpoint = open_checkpoint(path)
    config = LLMConfig(model=str(path), quantization=quantization, dtype=dtype)
    scheme = choose_quantization(config, checkpoint, torch.float32, torch.device("cpu"))
    return ModelRunner(path, dtypes.DTYPES[dtype], "cpu", 16, 16, None, 4, 512, quantization=scheme,
                       checkpoint=checkpoint)


def all_position_logits(model_runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    step = model_runner.prepare_inputs(
        SchedulerOutput([ScheduledSeq("r", prompt, 0, [4, 1, 7, 2, 9, *range(10, 16)][: -(-len(prompt) // 16)],
                                      True)], len(prompt))
    )
    with torch.inference_mode():
        hidden = model_runner.model(step.input_ids, step.positions, step.meta)
        return model_runner.model.compute_logits(hidden)


def greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        core.add_request(Request(f"r{i}", prompt, params, None))
        outputs[f"r{i}"] = []
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.request_id] += out.new_token_ids
    return [outputs[f"r{i}"] for i in range(len(prompts))]


def engine_core(path: Path, **overrides: object) -> EngineCore:
    config = LLMConfig(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=256, **overrides)
    return build_core(config, path)


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_f32_gguf_matches_the_safetensors_original(root: Path, variant: str) -> None:
    source = hf_dir(root, variant)
    path = save_tiny_gguf(source, root / f"{variant}.f32.gguf", "F32")
    torch.testing.assert_close(all_position_logits(runner(path), LONG_PROMPT),
                               all_position_logits(runner(source), LONG_PROMPT), rtol=1e-5, atol=2e-5)
    assert greedy(engine_core(path), PROMPTS) == greedy(engine_core(source), PROMPTS)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_q8_0_gguf_read_full_width_equals_its_dequantized_weights(root: Path, variant: str) -> None:
    source = hf_dir(root, variant)
    path = save_tiny_gguf(source, root / f"{variant}.q8.gguf", "Q8_0")
    # The reference: a safetensors checkpoint whose 2-D weights went through gguf's own Q8_0 round trip.
    reference = root / f"{variant}-q8-reference"
    shutil.copytree(source, reference, dirs_exist_ok=True)
    state = load_file(reference / "model.safetensors")
    for name, tensor in state.items():
        if tensor.dim() == 2:
            q8 = gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
            state[name] = torch.from_numpy(np.ascontiguousarray(deq)).to(tensor.dtype)
    save_file(state, reference / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(all_position_logits(runner(path), LONG_PROMPT),
                               all_position_logits(runner(reference), LONG_PROMPT), rtol=1e-5, atol=2e-5)
    assert greedy(engine_core(path, quantization="none"), PROMPTS) == greedy(engine_core(reference), PROMPTS)


# scheme -> (most relative L2 distance of all-position logits to float32 full width, least top-1 agreement over
# 70 positions) on the tiny random models; measured 0.015-0.025 / 0.91-0.99 (int8-weight-only: its kernel computes
# in bf16), 0.019-0.033 / 0.94-0.99 (int8-dynamic), 0.15-0.27 / 0.53-0.77 (int4 from float weights: 16 levels per
# group of 32 random-normal weights, near-tied random logits). Real-model agreement: tests/llm/test_demo_model.py.
SCHEME_BOUNDS = {"int8-weight-only": (0.035, 0.88), "int8-dynamic": (0.05, 0.9), "int4": (0.35, 0.45)}
# Without VNNI, int8-dynamic's activations are 7-bit (fbgemm's int16 pair sums would saturate; quant.py): measured
# 0.029-0.053 / 0.90-0.96 on an AVX2-only EPYC.
if not quant.has_vnni():
    SCHEME_BOUNDS["int8-dynamic"] = (0.065, 0.85)


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("scheme", list(SCHEME_BOUNDS))
def test_quantized_models_stay_near_full_width(root: Path, variant: str, scheme: str) -> None:
    source = root / variant if (root / variant / "config.json").exists() else hf_dir(root, variant)
    full = all_position_logits(runner(source), LONG_PROMPT)
    quantized_runner = runner(source, scheme)
    assert quantized_runner.quantization is not None and quantized_runner.quantization.method == scheme
    quantized = all_position_logits(quantized_runner, LONG_PROMPT)
    distance, min_agreement = SCHEME_BOUNDS[scheme]
    assert float((quantized - full).norm() / full.norm()) < distance
    assert float((quantized.argmax(-1) == full.argmax(-1)).float().mean()) >= min_agreement


def test_q4_1_gguf_repacked_to_int4_matches_its_dequantized_weights(root: Path) -> None:
    source = root / "llama" if (root / "llama" / "config.json").exists() else hf_dir(root, "llama")
    path = save_tiny_gguf(source, root / "llama.q4_1.gguf", "Q4_1")
    exact = all_position_logits(runner(path, "none"), LONG_PROMPT)  # the blocks dequantized, float32
    repacked_runner = runner(path, "auto")
    assert repacked_runner.quantization is not None and repacked_runner.quantization.method == "int4"
    repacked = all_position_logits(repacked_runner, LONG_PROMPT)
    # No requantization: only the kernel's bf16 scales/activations and the int8 head separate the two.
    assert float((repacked - exact).norm() / exact.norm()) < 0.03
    assert float((repacked.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.95


def test_auto_quantization_follows_the_checkpoint(root: Path) -> None:
    source = root / "qwen2" if (root / "qwen2" / "config.json").exists() else hf_dir(root, "qwen2")
    cpu = torch.device("cpu")

    def chosen(path: Path, requested: str = "auto") -> str | None:
        scheme = choose_quantization(LLMConfig(quantization=requested), open_checkpoint(path), torch.bfloat16, cpu)
        return None if scheme is None else scheme.method

    assert chosen(source) is None  # a float checkpoint stays full width
    assert chosen(save_tiny_gguf(source, root / "qwen2.f16.gguf", "F16")) is None
    assert chosen(save_tiny_gguf(source, root / "qwen2.q8.gguf", "Q8_0")) in ("int8-dynamic", "int8-weight-only")
    q4 = save_tiny_gguf(source, root / "qwen2.q4_0.gguf", "Q4_0")
    assert chosen(q4) == "int4"
    assert chosen(q4, "none") is None
    assert chosen(source, "int8") in ("int8-dynamic", "int8-weight-only")


def test_a_gguf_engine_serves_from_the_file_alone(root: Path) -> None:
    """Tokenizer, eos and chat template all come from the GGUF's metadata: no directory beside it is read."""
    source = root / "llama" if (root / "llama" / "config.json").exists() else hf_dir(root, "llama")
    alone = root / "alone"
    alone.mkdir(exist_ok=True)
    path = save_tiny_gguf(source, alone / "model.gguf", "Q8_0")
    tokenizer = load_tokenizer(open_checkpoint(path))
    assert tokenizer.encode("hello world") == load_tokenizer(open_checkpoint(source)).encode("hello world")
    core = build_core(LLMConfig(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=256), path,
                      tokenizer)
    [tokens] = greedy(core, [tokenizer.encode("hello world")], 5)
    assert len(tokens) == 5 and all(0 <= t < core.runner.vocab_size for t in tokens)


@pytest.mark.parametrize(
    ("flags", "saved", "device", "expected"),
    [
        ({"avx2", "avx512_bf16"}, "bfloat16", "cpu", torch.bfloat16),
        ({"avx2", "amx_bf16"}, "float32", "cpu", torch.float32),
        ({"avx2", "avx512_bf16"}, "float16", "cpu", torch.bfloat16),
        ({"avx2", "avx512f"}, "bfloat16", "cpu", torch.float32),  # emulated bf16 is slower than float32
        ({"avx2"}, "float16", "cpu", torch.float32),
        ({"avx2"}, "bfloat16", "cuda", torch.bfloat16),
        ({"avx2"}, "float32", "cuda", torch.bfloat16),
        ({"avx2"}, "float16", "cuda", torch.float16),
    ],
)
def test_dtype_auto_follows_native_support(monkeypatch, flags: set[str], saved: str, device: str,
                                           expected: torch.dtype) -> None:
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    dtype, why = dtypes.resolve_dtype("auto", {"torch_dtype": saved}, torch.device(device))
    assert dtype == expected and why.startswith("auto")
    assert dtypes.resolve_dtype("float16", {"torch_dtype": saved}, torch.device(device))[0] == torch.float16


@pytest.mark.parametrize(("saved", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.bfloat16),
                                                 ("float32", torch.float32)])
def test_dtype_auto_takes_bfloat16_where_ladles_gemm_runs_it(monkeypatch, saved: str, expected: torch.dtype) -> None:
    """An AVX2-only CPU: bfloat16 when ladle's tiled GEMM takes the model's (full-width) layers, else float32."""
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    cpu = torch.device("cpu")
    dtype, why = dtypes.resolve_dtype("auto", {"torch_dtype": saved}, cpu, bf16_gemm=True)
    assert dtype == expected and "ladle's GEMM" in why
    assert dtypes.resolve_dtype("auto", {"torch_dtype": saved}, cpu, bf16_gemm=False)[0] == torch.float32


def test_a_quantized_gguf_counts_as_bfloat16(monkeypatch) -> None:
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert dtypes.resolve_dtype("auto", {"torch_dtype": "float32"}, torch.device("cpu"), quantized=True)[0] \
        == torch.bfloat16


def test_checkpoint_dtype_reads_both_spellings() -> None:
    assert dtypes.checkpoint_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert dtypes.checkpoint_dtype({"torch_dtype": "torch.float16"}) == "float16"
    assert dtypes.checkpoint_dtype(json.loads('{"torch_dtype": null}')) is None


def test_auto_dtype_of_a_bfloat16_checkpoint_here(root: Path, tmp_path: Path) -> None:
    """On this host: bfloat16 where the CPU has native bf16 or ladle's GEMM takes the full-width model's bfloat16
    layers, else float32; a model to be quantized gets float32 where bf16 is not native (ladle's GEMM does not run
    quantized layers)."""
    path = tmp_path / "llama-bf16"
    shutil.copytree(hf_dir(root, "llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    native, tiled = dtypes.cpu_has_native_bf16(), tiled_gemm_runs(torch.bfloat16, torch.device("cpu"))
    full = build_core(LLMConfig(model=str(path), dtype="auto", num_kv_blocks=16, max_model_len=128), path)
    assert full.runner.dtype == (torch.bfloat16 if native or tiled else torch.float32)
    assert not tiled or isinstance(full.runner.model.layers[0].mlp.gate_up_proj, TiledLinear)
    int8 = build_core(LLMConfig(model=str(path), dtype="auto", quantization="int8", num_kv_blocks=16,
                                max_model_len=128), path)
    assert int8.runner.dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize(
    ("requested", "dtype", "quantized", "device", "expected"),
    [
        ("auto", torch.float32, False, "cpu", torch.float32),  # full width: an exact cache (transformers parity)
        ("auto", torch.float32, True, "cpu", torch.float16),  # int8/int4 on a CPU: llama.cpp's default width
        ("auto", torch.bfloat16, True, "cpu", torch.bfloat16),  # 16 bits already
        ("auto", torch.bfloat16, False, "cuda", torch.bfloat16),
        ("float32", torch.float32, True, "cpu", torch.float32),  # asked for: kept
        ("bfloat16", torch.float32, False, "cpu", torch.bfloat16),
    ],
)
def test_kv_cache_dtype_auto_is_16_bit_only_under_quantized_weights(
        requested: str, dtype: torch.dtype, quantized: bool, device: str, expected: torch.dtype) -> None:
    chosen, why = dtypes.resolve_kv_cache_dtype(requested, dtype, quantized, torch.device(device))
    assert chosen == expected
    assert why.startswith("auto" if requested == "auto" else "asked for")
