"""Building blocks shared by the model families: the CausalLM interface, rotary tables, RMSNorm, config checks.

Rotary cos/sin tables are computed once at load (float32 math, stored in the model dtype) and indexed by the step's
positions once per step; layers only multiply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ladle.llm.attention import AttentionMetadata
from ladle.llm.compiled import step_metadata
from ladle.llm.models.linear import packed_linear, prepack_linears


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something ladle does not implement (it is refused, not approximated)."""


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: `param[rows]` (a slice of a fused q/k/v or gate/up weight), transposed for
    GPT-2's Conv1D, which stores [in, out]."""

    param: Any  # torch.Tensor, or a sink with .shape and .write(rows, value) for quantized weights
    rows: slice | None = None
    transpose: bool = False

    @property
    def expected_shape(self) -> tuple[int, ...]:
        shape = tuple(self.param.shape)  # a Parameter, or a quantized layer's staging sink (quant.py)
        if self.rows is not None:
            shape = (len(range(*self.rows.indices(shape[0]))), *shape[1:])
        return shape[::-1] if self.transpose else shape


class CausalLM(nn.Module):
    """What the runner needs from a model: shapes of its KV cache, a flat-batch forward, logits for chosen rows."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int

    def __init__(self) -> None:
        super().__init__()
        # The output head when it is not a plain matmul with lm_head_weight(): oneDNN-prepacked (prepack()) or
        # quantized (set_head()). An instance attribute: a class attribute would shadow the submodule.
        self.head: nn.Module | None = None
        # hidden_states compiled (precompiled.Decoder, called with the model first), installed by the runner once its
        # graphs are built and checked against this model
        self.compiled: Callable[..., torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] of a flat batch; `meta` describes its sequences to attention."""
        with step_metadata(meta):
            if self.compiled is not None:
                return self.compiled(self, input_ids, positions, meta.packed)
            return self.hidden_states(input_ids, positions, meta.packed)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, step: torch.Tensor | None
                      ) -> torch.Tensor:
        """The decoder itself (what precompiled.py compiles). Attention reads the step from `step` (the packed
        metadata, for the C++ operator; None without it) or from step_metadata (the torch path)."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for the given final hidden rows (matmul in the model dtype, as vLLM does)."""
        if self.head is not None:
            return self.head(hidden).float()
        return F.linear(hidden, self.lm_head_weight()).float()

    def prepack(self) -> None:
        """Switch every linear layer, and the output head, to oneDNN-prepacked weights (see linear.py).
        A tied head keeps the embedding table for lookups and adds a packed copy."""
        prepack_linears(self)
        if self.head is None:
            self.head = packed_linear(self.lm_head_weight())

    def set_head(self, head: nn.Module) -> None:
        """Compute logits with `head` (a quantized copy of the head weight). An untied lm_head's full-width
        weight is then dropped; a tied one stays, as the embedding table."""
        self.head = head
        lm_head = getattr(self, "lm_head", None)
        if isinstance(lm_head, nn.Parameter):
            lm_head.data = torch.empty(0, dtype=lm_head.dtype, device=lm_head.device)

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_layout(self) -> dict[str, WeightTarget]:
        """HF tensor name -> destination; a tied lm_head is simply absent."""
        raise NotImplementedError

    def canonical_name(self, name: str) -> str:
        """Map a checkpoint tensor name onto the layout's spelling (checkpoints differ in prefixes)."""
        return name

    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        """Checkpoint tensors that are derived buffers, not weights (skipped silently)."""
        return ()

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]],
                      op: Callable[..., torch.Tensor] | None = None) -> None:
        """Give each attention layer its (k_cache, v_cache) views, and the C++ attention operator when there is one
        (kernels/paged.py: paged_attention_op)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Compute derived tables (rotary) once the parameters live on their device."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)


def cfg_get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` present (and not None) in the config: HF renamed fields across versions."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim (float32 statistics, like transformers)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings as transformers 5 stores them (`rope_parameters`) or 4 did (`rope_theta` + `rope_scaling`)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    require(
        not any(isinstance(v, dict) for v in params.values()),
        "per-layer-type rope_parameters are not supported",
    )
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    require(
        params["rope_type"] in ("default", "llama3"),
        f"rope_type {params['rope_type']!r} is not supported (supported: 'default', 'llama3')",
    )
    factor = cfg_get(params, "partial_rotary_factor", default=config.get("partial_rotary_factor", 1.0))
    require(factor == 1.0, f"partial_rotary_factor={factor} is not supported (only 1.0)")
    # GGUF files of Llama 3.x carry their rope scaling as per-frequency divisors (llama.cpp's rope_freqs tensor).
    params["freq_factors"] = config.get("rope_freq_factors")
    require(
        not (params["freq_factors"] and params["rope_type"] == "llama3"),
        "both rope_freq_factors and llama3 rope scaling are set; they describe the same scaling twice",
    )
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any], max_position: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, the way transformers computes them (incl. llama3 scaling)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(params["rope_theta"]) ** exponent)
    if params.get("freq_factors"):
        factors = torch.tensor(params["freq_factors"], dtype=torch.float32)
        require(factors.shape == inv_freq.shape, f"rope_freq_factors has {factors.numel()} values, not {head_dim // 2}")
        return inv_freq / factors
    if params["rope_type"] != "llama3":
        return inv_freq
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params.get("original_max_position_embeddings") or max_position)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """Precomputed rotate-half rotary tables: cos [P, D] and sign-folded sin [P, D] = cat(-sin, sin), so that
    rope(x) = x * cos + roll(x, D/2) * sin_signed (3 ops per call, q and k rotated together)."""

    def __init__(self, inv_freq: torch.Tensor, max_position: int, dtype: torch.dtype, device: torch.device) -> None:
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(device=device, dtype=dtype)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows for the step's positions, shaped [T, 1, D] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)



def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [T, heads, D] with Rotary.lookup's tables."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
