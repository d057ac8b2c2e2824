"""Model forward passes vs transformers (every position's logits), bf16 sanity, and the loader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ladle.llm.models.layers import UnsupportedModelError
from ladle.llm.models.linear import can_prepack
from ladle.llm.models.loader import ModelLoadError
from ladle.llm.models.registry import supported_architectures
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.runner import ModelRunner
from tests.fixtures.tiny_llm import VARIANTS, save_tiny_model

PROMPT = [(11 * i + 5) % 509 for i in range(70)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(root / name, arch, **kw) for name, (arch, kw) in VARIANTS.items()}


def all_position_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one prefill (the runner itself returns only sampled rows)."""
    step = runner.prepare_inputs(SchedulerOutput([ScheduledSeq("r", prompt, 0, [4, 1, 7, 2, 9], True)], len(prompt)))
    with torch.inference_mode():
        hidden = runner.model(step.input_ids, step.positions, step.meta)
        return runner.model.compute_logits(hidden)


def hf_logits(path: Path, prompt: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_prefill_logits_match_transformers(model_dirs: dict[str, Path], case: str) -> None:
    runner = ModelRunner(model_dirs[case], torch.float32, "cpu", 16, 16, None, 4, 512)
    got = all_position_logits(runner, PROMPT)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPT), runner.vocab_size)
    torch.testing.assert_close(got, hf_logits(model_dirs[case], PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama", "qwen3", "gpt2"])
def test_bfloat16_tracks_float32(model_dirs: dict[str, Path], case: str) -> None:
    fp32 = all_position_logits(ModelRunner(model_dirs[case], torch.float32, "cpu", 16, 16, None, 4, 512), PROMPT)
    bf16 = all_position_logits(ModelRunner(model_dirs[case], torch.bfloat16, "cpu", 16, 16, None, 4, 512), PROMPT)
    assert bf16.dtype == torch.float32  # logits come back float32 whatever the model dtype
    # Loose but meaningful: our bf16 error is no worse than transformers' own bf16 error (x2), small against the
    # logit spread, and the greedy choice agrees almost everywhere (it may flip only where the top two nearly tie).
    hf_bf16 = hf_logits(model_dirs[case], PROMPT, torch.bfloat16)
    ours, theirs = (bf16 - fp32).abs().max().item(), (hf_bf16 - fp32).abs().max().item()
    assert ours <= 2 * theirs + 1e-3 and ours < 0.1 * fp32.std().item(), (ours, theirs)
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu")), reason="CPU lacks oneDNN bf16")
@pytest.mark.parametrize("case", ["qwen2", "gpt2"])
def test_prepacked_linears_match_plain_bfloat16(model_dirs: dict[str, Path], case: str) -> None:
    """The oneDNN path (fused residual/SwiGLU/GELU epilogues) computes the same function as the plain one."""
    packed_runner = ModelRunner(model_dirs[case], torch.bfloat16, "cpu", 16, 16, None, 4, 512)
    plain_runner = ModelRunner(model_dirs[case], torch.bfloat16, "cpu", 16, 16, None, 4, 512, prepack=False)
    assert packed_runner.prepacked and not plain_runner.prepacked
    packed, plain = all_position_logits(packed_runner, PROMPT), all_position_logits(plain_runner, PROMPT)
    assert (packed - plain).abs().max() < 0.05 * plain.std()  # only bf16 rounding points differ
    assert (packed.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.9


def test_sharded_checkpoint_loads(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    sharded = save_tiny_model(tmp_path / "sharded", "llama", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    runner = ModelRunner(sharded, torch.float32, "cpu", 16, 16, None, 4, 512)
    reference = ModelRunner(model_dirs["llama"], torch.float32, "cpu", 16, 16, None, 4, 512)
    torch.testing.assert_close(all_position_logits(runner, PROMPT[:20]), all_position_logits(reference, PROMPT[:20]))


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(path: Path, edit: callable) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path: Path, **fields: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_loader_errors_name_the_problem(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    def load(p: Path) -> ModelRunner:
        return ModelRunner(p, torch.float32, "cpu", 16, 4, None, 4, 512)

    name = "model.layers.1.mlp.up_proj.weight"
    missing = _copy_model(model_dirs["llama"], tmp_path / "missing")
    _edit_weights(missing, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=rf"missing 1 tensor\(s\): {name}"):
        load(missing)
    shaped = _copy_model(model_dirs["llama"], tmp_path / "shaped")
    _edit_weights(shaped, lambda t: t.update({name: t[name][:, :10].contiguous()}))
    with pytest.raises(ModelLoadError, match=rf"{name}.*shape \(128, 10\), expected \(128, 64\)"):
        load(shaped)
    extra = _copy_model(model_dirs["llama"], tmp_path / "extra")
    _edit_weights(extra, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        load(extra)
    corrupt = _copy_model(model_dirs["llama"], tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupt"):
        load(corrupt)
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load(corrupt)


def test_unsupported_configs_are_refused(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    def refused(name: str, message: str, **fields: object) -> None:
        path = _copy_model(model_dirs["llama"], tmp_path / name)
        _edit_config(path, **fields)
        with pytest.raises(UnsupportedModelError, match=message):
            ModelRunner(path, torch.float32, "cpu", 16, 4, None, 4, 512)

    refused("arch", "unsupported model architecture.*supported: GPT2LMHeadModel, LlamaForCausalLM",
            architectures=["MambaForCausalLM"])
    refused("yarn", "rope_type 'yarn' is not supported", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    refused("window", "sliding-window attention", architectures=["MistralForCausalLM"], sliding_window=64)
    refused("act", "hidden_act='gelu' is not supported", hidden_act="gelu")
    assert "Qwen3ForCausalLM" in supported_architectures()


def test_transformers4_style_rope_config_is_read(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Checkpoints saved by transformers 4 carry rope_theta + rope_scaling instead of rope_parameters."""
    path = _copy_model(model_dirs["llama3_rope"], tmp_path / "v4")
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    _edit_config(path, rope_parameters=None, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    v4 = ModelRunner(path, torch.float32, "cpu", 16, 16, None, 4, 512)
    v5 = ModelRunner(model_dirs["llama3_rope"], torch.float32, "cpu", 16, 16, None, 4, 512)
    torch.testing.assert_close(all_position_logits(v4, PROMPT), all_position_logits(v5, PROMPT))
