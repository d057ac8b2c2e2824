"""Read a llama.cpp GGUF file as a ladle checkpoint: an HF-style config, HF-named tensors, and its tokenizer.

Invariant: `GGUFCheckpoint.open` refuses, naming the culprit, any file ladle could not serve exactly (an architecture,
tensor, tensor type or split it does not know); a file it accepts yields every tensor under the name, shape and row
order of the Hugging Face checkpoint it was converted from (llama.cpp's q/k row permutation undone), floats in their
stored dtype and block-quantized weights as `GGMLBlocks`, one tensor at a time from a memory map held open for the
checkpoint's lifetime (opening reads only the header; memory does not grow with the file).

Config rules (what `config` holds beyond the file's plain hyperparameters):
- torch_dtype: "bfloat16" if any float tensor is BF16, else "float16" if any is F16, else "float32". llama.cpp keeps
  norms in F32 next to half weights, so a half type anywhere is the model's; a quantized file whose only float
  tensors are its F32 norms says "float32" (the dtype its unquantized tensors are exact in).
- rope: `rope_theta` from rope.freq_base; `rope_scaling` only where the metadata states a scaling type (linear,
  yarn, ...). Llama 3.x files carry llama3 rope scaling as the `rope_freqs` tensor instead (per-frequency divisors
  of the inverse frequencies: inv_freq[i] = rope_theta ** (-2i / head_dim) / rope_freq_factors[i]); it becomes
  `rope_freq_factors` and a llama3 `rope_scaling` is then never emitted, so the scaling cannot apply twice.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ladle.errors import LadleError
from ladle.llm.models.qtensor import BLOCK_LAYOUT, GGMLBlocks, ggml_type_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.reader import GgufHeader, TensorInfo

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SPLIT_HINT = "split GGUF files are not supported; merge with llama-gguf-split --merge"
_SPLIT_NAME = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)

FLOAT_TYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
SUPPORTED_TYPES: tuple[int, ...] = (*FLOAT_TYPES, *BLOCK_LAYOUT)

# GGUF general.architecture -> the HF architecture ladle implements it with.
ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# convert_hf_to_gguf.py permutes q/k rows (for llama.cpp's interleaved rope kernel) only for these.
_PERMUTED = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"

# Byte-level pre-tokenizers llama.cpp knows that transformers' GGUF tokenizer mapping leaves at GPT-2's split:
# these split every digit apart first (llama-vocab.cpp: "\p{N}", then GPT-2's regex), as StarCoder-style
# tokenizer.json files do with Digits(individual_digits=True) + ByteLevel.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# Those whose split is GPT-2's own, which the byte-level builder already uses.
_GPT2_SPLIT_PRE = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"}


class GGUFError(LadleError):
    """The GGUF file is unreadable, or holds something ladle cannot serve."""

    status = 500


def is_gguf(path: Path) -> bool:
    """A file named *.gguf, or one that starts with the GGUF magic bytes."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(directory: Path) -> Path | None:
    """The one *.gguf file in `directory`, None if there is none; several (or a split set) are refused."""
    files = sorted(p for p in Path(directory).glob("*.gguf") if p.is_file())
    split = [p.name for p in files if _SPLIT_NAME.search(p.name)]
    if split:
        raise GGUFError(f"{directory} holds {', '.join(split)}: {SPLIT_HINT}")
    if len(files) > 1:
        raise GGUFError(
            f"{directory} holds several GGUF files ({', '.join(p.name for p in files)}); "
            "point the model at one of them"
        )
    return files[0] if files else None


class GGUFCheckpoint:
    """An open GGUF file: `config`, `tensors()` and `tokenizer()` in Hugging Face terms (see the module docstring)."""

    def __init__(
        self, path: Path, header: GgufHeader, metadata: dict[str, Any], names: dict[str, str], config: dict[str, Any]
    ) -> None:
        from transformers.integrations.gguf.reader import load_gguf_state_dict

        self.path = path
        self.architecture: str = header.architecture
        self.metadata = metadata  # string arrays (vocabulary, merges) are left as their lengths
        self.config = config
        self._header = header
        self._hf_names = names  # GGUF name -> HF name, for every tensor `tensors()` yields
        self.gguf_names = {hf: gguf for gguf, hf in names.items()}  # HF name -> GGUF name
        self.tensor_types = {names[t.name]: ggml_type_name(t.ggml_type) for t in header.tensors if t.name in names}
        self.quantized = any(t.ggml_type in BLOCK_LAYOUT for t in header.tensors)
        # Lazy views of one read-only memmap: nothing is read until a tensor is asked for.
        self._lazy: dict[str, Any] | None = load_gguf_state_dict(header)

    @classmethod
    def open(cls, path: Path) -> GGUFCheckpoint:
        """Read the header and check everything ladle needs; tensor data stays on disk until `tensors()`."""
        started = time.perf_counter()
        path = Path(path)
        _require_transformers_gguf()
        header, metadata = _read_header(path)
        _check_tensors(path, header)
        names = _hf_names(path, header, metadata)
        config = _config(path, header, metadata)
        checkpoint = cls(path, header, metadata, names, config)
        logger.info(
            "opened %s (%s, %d tensors%s) in %.3f s", path.name, checkpoint.architecture, checkpoint.tensor_count,
            ", quantized" if checkpoint.quantized else "", time.perf_counter() - started,
        )
        return checkpoint

    @property
    def tensor_count(self) -> int:
        return len(self._hf_names)

    @property
    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence id, then end-of-turn / end-of-message ids where the file names them (deduplicated)."""
        keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        ids = [self.metadata.get(f"tokenizer.ggml.{key}") for key in keys]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def where(self, name: str) -> str:
        """Where an HF-named tensor lives, for error messages."""
        gguf_name = self.gguf_names.get(name)
        return f"{self.path.name} ({gguf_name})" if gguf_name else self.path.name

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | GGMLBlocks]]:
        """(HF name, tensor) in file order; each is copied out of the memmap as it is reached."""
        for info in self._header.tensors:
            name = self._hf_names.get(info.name)
            if name is not None:
                yield name, self._unpermute(info.name, self._read(info))

    def close(self) -> None:
        """Drop the memory map (also dropped with the checkpoint)."""
        self._lazy = None

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The file's tokenizer as a transformers fast tokenizer (about 0.5 s for a 50k vocabulary)."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

        try:
            arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(self.path))
            backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise GGUFError(f"cannot build the tokenizer of {self.path.name}: {e}") from e
        _set_pre_tokenizer(backend, tokenizer_dict, self.path)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=tokenizer_config.get("bos_token"),
            eos_token=tokenizer_config.get("eos_token"),
            unk_token=tokenizer_config.get("unk_token"),
            pad_token=tokenizer_config.get("pad_token"),
            # Passed explicitly, both: the wrapper then builds the post-processor that adds them (or adds nothing).
            add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
            add_eos_token=bool(tokenizer_config.get("add_eos_token", False)),
            chat_template=tokenizer_config.get("chat_template"),
            clean_up_tokenization_spaces=False,
            model_max_length=self.config["max_position_embeddings"],
        )

    def _read(self, info: TensorInfo) -> torch.Tensor | GGMLBlocks:
        if self._lazy is None:
            raise GGUFError(f"{self.path.name} was closed")
        try:
            data = self._lazy[info.name][...]  # a copy: torch warns on (and must not write to) the read-only map
        except (ValueError, RuntimeError) as e:
            raise GGUFError(f"cannot read tensor {info.name!r} from {self.path}: {e} (the file is corrupt)") from e
        if info.ggml_type in FLOAT_TYPES:
            return data
        return GGMLBlocks(info.ggml_type, (info.shape[0], info.shape[1]), data)

    def _unpermute(self, gguf_name: str, value: torch.Tensor | GGMLBlocks) -> torch.Tensor | GGMLBlocks:
        if self.architecture not in _PERMUTED:
            return value
        heads = _permuted_heads(gguf_name, self.config)
        if heads is None:
            return value
        rows = value.shape[0]
        index = _unpermute_index(rows, heads)
        return value.rows(index) if isinstance(value, GGMLBlocks) else value[index]


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row i of the HF weight is row index[i] of llama.cpp's: the inverse of convert_hf_to_gguf.py's
    `w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)` applied to row numbers. A pure row gather, so it
    is exact on blocks too (blocks run along rows)."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def _permuted_heads(gguf_name: str, config: dict[str, Any]) -> int | None:
    """The head count a q/k weight or bias was permuted with (k uses the KV heads), None for other tensors."""
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    leaf = match.group(2) if match else None
    if leaf == "attn_q":
        return config["num_attention_heads"]
    if leaf == "attn_k":
        return config["num_key_value_heads"]
    return None


# --- opening: header, checks, names, config ---------------------------------------------------------------------


def _require_transformers_gguf() -> None:
    try:
        import transformers.integrations.gguf.reader  # noqa: F401
    except ImportError as e:
        raise GGUFError(
            f"reading GGUF files needs transformers' GGUF reader (transformers.integrations.gguf, as in 5.24): {e}"
        ) from e


def _read_header(path: Path) -> tuple[GgufHeader, dict[str, Any]]:
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    _check_file(path)
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as e:
        raise GGUFError(f"cannot read the GGUF header of {path}: {e} (the file is corrupt or truncated)") from e
    if int(metadata.get("split.count", 1)) > 1:
        raise GGUFError(f"{path.name} is one part of a split GGUF: {SPLIT_HINT}")
    _check_architecture(path, metadata["general.architecture"])
    try:
        header = GgufHeader.from_file(str(path))
    except ValueError as e:
        # transformers' reader stops at a ggml type it cannot size; name the tensor the way ladle does.
        raise GGUFError(_unreadable_types_message(path) or f"cannot read the tensor table of {path}: {e}") from e
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise GGUFError(f"cannot read the tensor table of {path}: {e} (the file is corrupt or truncated)") from e
    return header, metadata


def _check_file(path: Path) -> None:
    if _SPLIT_NAME.search(path.name):
        raise GGUFError(f"{path.name}: {SPLIT_HINT}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"cannot open {path}: {e}") from e
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")


def _check_architecture(path: Path, architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise GGUFError(
            f"{path.name} holds a {architecture!r} model; GGUF architectures ladle serves: {', '.join(ARCHITECTURES)}"
        )


def _unsupported_message(path: Path, offenders: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{name} ({type_name})" for name, type_name in offenders[:5])
    more = f" and {len(offenders) - 5} more" if len(offenders) > 5 else ""
    supported = ", ".join(ggml_type_name(t) for t in SUPPORTED_TYPES)
    return (
        f"{path.name} holds tensors of a type ladle cannot read: {shown}{more}; supported types: {supported} "
        "(re-quantize the original model to one of them with llama-quantize)"
    )


def _unreadable_types_message(path: Path) -> str | None:
    """Slow path, only for a file transformers' reader refused: list its unsupported tensors with gguf's reader."""
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception:  # any failure here only means there is nothing better to say
        return None
    offenders = [(t.name, t.tensor_type.name) for t in tensors if int(t.tensor_type) not in SUPPORTED_TYPES]
    return _unsupported_message(path, offenders) if offenders else None


def _check_tensors(path: Path, header: GgufHeader) -> None:
    """Every tensor of a supported type, block tensors 2-D, and all of them inside the file."""
    offenders = [(t.name, ggml_type_name(t.ggml_type)) for t in header.tensors if t.ggml_type not in SUPPORTED_TYPES]
    if offenders:
        raise GGUFError(_unsupported_message(path, offenders))
    size = path.stat().st_size
    for t in header.tensors:
        if t.ggml_type in BLOCK_LAYOUT and len(t.shape) != 2:
            raise GGUFError(f"{path.name}: tensor {t.name!r} is {ggml_type_name(t.ggml_type)} but not 2-D {t.shape}")
        if header.data_start + t.offset + t.nbytes > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} ends past the end of the file (re-download it)")


def _hf_names(path: Path, header: GgufHeader, metadata: dict[str, Any]) -> dict[str, str]:
    """GGUF name -> HF name for every tensor but rope_freqs; any other tensor ladle does not know is refused."""
    arch = header.architecture
    layers = metadata[f"{arch}.block_count"]
    leaves = _LAYER_NAMES | (_QK_NORM_NAMES if arch == "qwen3" else {})
    names: dict[str, str] = {}
    for info in header.tensors:
        if info.name == _ROPE_FREQS:
            continue
        hf_name = _GLOBAL_NAMES.get(info.name)
        match = _LAYER_TENSOR.fullmatch(info.name)
        if match and int(match.group(1)) < layers and match.group(2) in leaves:
            layer, leaf, kind = match.groups()
            hf_name = f"model.layers.{layer}.{leaves[leaf]}.{kind}"
        if hf_name is None:
            raise GGUFError(
                f"{path.name} holds tensor {info.name!r}, which ladle's {ARCHITECTURES[arch]} has no place for "
                "(a model variant ladle does not implement)"
            )
        names[info.name] = hf_name
    return names


def _config(path: Path, header: GgufHeader, metadata: dict[str, Any]) -> dict[str, Any]:
    """An HF config.json dict for ladle's model class, from llama.cpp's metadata keys and the tensor table."""
    arch = header.architecture
    infos = {t.name: t for t in header.tensors}

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path.name} has no `{arch}.{name}` in its metadata (a broken conversion)")
        return value

    heads = key("attention.head_count")
    head_dim = key("attention.key_length", key("embedding_length") // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{path.name}: value heads of {key('attention.value_length')} differ from key heads")
    if "token_embd.weight" not in infos:
        raise GGUFError(f"{path.name} has no token_embd.weight")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        # the embedding's rows, not the token list: llama.cpp pads the list, the model's shape is what matters
        "vocab_size": infos["token_embd.weight"].shape[0],
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": "blk.0.attn_q.bias" in infos,
        "mlp_bias": "blk.0.ffn_up.bias" in infos,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _float_dtype_name(header),
    }
    _check_permutable(path, arch, config)
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim  # ladle refuses it with its own message
    config.update(_rope_scaling(path, header, metadata))
    return config


def _check_permutable(path: Path, arch: str, config: dict[str, Any]) -> None:
    if arch in _PERMUTED and config["head_dim"] % 2:
        raise GGUFError(f"{path.name}: head_dim {config['head_dim']} is odd, so its q/k rows cannot be un-permuted")


def _rope_scaling(path: Path, header: GgufHeader, metadata: dict[str, Any]) -> dict[str, Any]:
    """`rope_freq_factors` from a rope_freqs tensor, else `rope_scaling` from the metadata (module docstring)."""
    arch = header.architecture
    freqs = next((t for t in header.tensors if t.name == _ROPE_FREQS), None)
    if freqs is not None:
        return {"rope_freq_factors": _read_rope_freqs(path, header, freqs)}
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return {}
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(metadata.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return {"rope_scaling": scaling}


def _read_rope_freqs(path: Path, header: GgufHeader, info: TensorInfo) -> list[float]:
    if info.ggml_type != 0 or len(info.shape) != 1:
        raise GGUFError(f"{path.name}: rope_freqs.weight is {ggml_type_name(info.ggml_type)} {info.shape}, not F32 1-D")
    factors = np.fromfile(path, dtype="<f4", count=info.shape[0], offset=header.data_start + info.offset)
    return [float(f) for f in factors]


def _float_dtype_name(header: GgufHeader) -> str:
    types = {t.ggml_type for t in header.tensors}
    for ggml_type, name in ((30, "bfloat16"), (1, "float16")):
        if ggml_type in types:
            return name
    return "float32"


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


# --- tokenizer ---------------------------------------------------------------------------------------------------


def _set_pre_tokenizer(backend: Any, tokenizer_dict: dict[str, Any], path: Path) -> None:
    """Fill in the byte-level splits transformers' GGUF mapping lacks (see _DIGIT_SPLIT_PRE)."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if tokenizer_dict.get("tokenizer_type") != "gpt2":
        return
    pre = tokenizer_dict.get("pre_tokenizer_type") or "default"
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in _GPT2_SPLIT_PRE:
        logger.warning(
            "%s: pre-tokenizer %r is unknown to ladle; splitting text like GPT-2, so token ids may differ from the "
            "original tokenizer's", path.name, pre,
        )
