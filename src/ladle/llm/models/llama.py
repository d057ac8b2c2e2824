"""Llama-family decoders over a paged KV cache: Llama (incl. SmolLM, TinyLlama), Mistral without sliding window,
Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm). q/k/v and gate/up are fused into one matmul each; the
checkpoint layout maps HF's separate tensors onto row slices of the fused weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ladle.llm import compiled
from ladle.llm.models.layers import (
    CausalLM,
    RMSNorm,
    Rotary,
    WeightTarget,
    apply_rope,
    cfg_get,
    require,
    rms_norm,
    rope_inv_freq,
    rope_parameters,
)
from ladle.llm.models.linear import GateUpLinear, Linear


@dataclass(frozen=True)
class LlamaArgs:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    eps: float
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict[str, Any]

    @classmethod
    def parse(cls, cfg: dict[str, Any], qkv_bias: bool | None, qk_norm: bool) -> LlamaArgs:
        """`qkv_bias=None` means "from config.attention_bias" (which then also biases o_proj)."""
        _check_supported(cfg)
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg_get(cfg, "num_key_value_heads", default=heads),
            head_dim=cfg_get(cfg, "head_dim", default=cfg["hidden_size"] // heads),
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            max_positions=cfg.get("max_position_embeddings", 2048),
            eps=cfg_get(cfg, "rms_norm_eps", default=1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias if qkv_bias is None else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            rope=rope_parameters(cfg),
        )


def _check_supported(cfg: dict[str, Any]) -> None:
    act = cfg_get(cfg, "hidden_act", "hidden_activation", default="silu")
    require(act == "silu", f"hidden_act={act!r} is not supported (only 'silu')")
    window = cfg.get("sliding_window")
    # Qwen2/3 keep a sliding_window value that only applies with use_sliding_window; Mistral's applies whenever set,
    # but a window as long as the context never slides.
    uses_window = cfg.get("use_sliding_window", "use_sliding_window" not in cfg)
    active = bool(window) and uses_window and window < cfg.get("max_position_embeddings", 0)
    layer_types = cfg.get("layer_types") or []
    require(
        not active and "sliding_attention" not in layer_types,
        f"sliding-window attention (sliding_window={window}) is not supported; "
        "only models whose window covers the whole context can be served",
    )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        self.q_size, self.kv_size = a.heads * a.head_dim, a.kv_heads * a.head_dim
        self.qkv_proj = Linear(a.hidden, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = Linear(self.q_size, a.hidden, bias=a.o_bias)
        self.q_norm = RMSNorm(a.head_dim, a.eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.eps) if a.qk_norm else None
        self.qk_norm_weight: torch.Tensor | None = None  # [heads + kv_heads, D], built in prepare()
        self.eps = a.eps
        self.scale = a.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)
        self.paged_op: Callable[..., torch.Tensor] | None = None  # kernels/ops.cpp's attention, when bound
        self.handle = compiled.register(self)  # how a compiled decoder's Python attention op finds this layer's cache

    def prepare(self) -> None:
        if self.q_norm is not None and self.k_norm is not None:
            q_w = self.q_norm.weight.detach().expand(self.heads, -1)
            k_w = self.k_norm.weight.detach().expand(self.kv_heads, -1)
            self.qk_norm_weight = torch.cat((q_w, k_w))

    def forward(self, x: torch.Tensor, residual: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                step: torch.Tensor | None) -> torch.Tensor:
        """residual + o_proj(attention(x)); `step`: the step's packed attention metadata."""
        tokens, (cos, sin) = x.shape[0], rope
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused output: normalise and rotate them as one [T, heads + kv_heads, D] tensor.
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, self.heads + self.kv_heads, self.head_dim)
        if self.qk_norm_weight is not None:
            qk = rms_norm(qk, None, self.eps) * self.qk_norm_weight
        qk = apply_rope(qk, cos, sin)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.kv_heads, self.head_dim)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        out = compiled.attention(self, q, k, v, step)
        return self.o_proj.add(out, residual)


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.intermediate = a.intermediate
        self.gate_up_proj = GateUpLinear(a.hidden, 2 * a.intermediate, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate, a.hidden, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + down(silu(gate(x)) * up(x))."""
        return self.down_proj.add(self.gate_up_proj.swiglu(x), residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden, a.eps)
        self.self_attn = LlamaAttention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden, a.eps)
        self.mlp = LlamaMLP(a)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: torch.Tensor | None
                ) -> torch.Tensor:
        """x is the residual stream; each sublayer's output projection adds into it (fused where packed)."""
        x = self.self_attn(self.input_layernorm(x), x, rope, step)
        return self.mlp(self.post_attention_layernorm(x), x)


class LlamaForCausalLM(CausalLM):
    qkv_bias: bool | None = None  # None: from config.attention_bias
    qk_norm = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        a = self.args = LlamaArgs.parse(config, self.qkv_bias, self.qk_norm)
        self.num_layers, self.num_kv_heads, self.head_dim = a.layers, a.kv_heads, a.head_dim
        self.vocab_size, self.max_model_len = a.vocab, a.max_positions
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden, a.eps)
        self.lm_head = None if a.tie_embeddings else nn.Parameter(torch.empty(a.vocab, a.hidden))
        self.rotary: Rotary | None = None

    def prepare(self) -> None:
        weight = self.embed_tokens.weight
        inv_freq = rope_inv_freq(self.head_dim, self.args.rope, self.max_model_len)
        self.rotary = Rotary(inv_freq, self.max_model_len, weight.dtype, weight.device)
        for layer in self.layers:
            layer.self_attn.prepare()

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, step: torch.Tensor | None
                      ) -> torch.Tensor:
        assert self.rotary is not None, "call prepare() after loading weights"
        rope = self.rotary.lookup(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, rope, step)
        return self.norm(x)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]],
                      op: Callable[..., torch.Tensor] | None = None) -> None:
        for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            attn = layer.self_attn
            attn.k_cache, attn.v_cache, attn.paged_op = k_cache, v_cache, op

    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        return ("rotary_emb.inv_freq", "lm_head.weight")  # lm_head.weight: only reached when tied

    def checkpoint_layout(self) -> dict[str, WeightTarget]:
        out = {"model.embed_tokens.weight": WeightTarget(self.embed_tokens.weight)}
        out["model.norm.weight"] = WeightTarget(self.norm.weight)
        if self.lm_head is not None:
            out["lm_head.weight"] = WeightTarget(self.lm_head)
        for i, layer in enumerate(self.layers):
            out.update(_layer_layout(f"model.layers.{i}.", layer))
        return out


def _layer_layout(prefix: str, layer: LlamaDecoderLayer) -> dict[str, WeightTarget]:
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate
    fused = {
        "self_attn.q_proj": (attn.qkv_proj, slice(0, q)),
        "self_attn.k_proj": (attn.qkv_proj, slice(q, q + kv)),
        "self_attn.v_proj": (attn.qkv_proj, slice(q + kv, q + 2 * kv)),
        "self_attn.o_proj": (attn.o_proj, None),
        "mlp.gate_proj": (mlp.gate_up_proj, slice(0, inter)),
        "mlp.up_proj": (mlp.gate_up_proj, slice(inter, 2 * inter)),
        "mlp.down_proj": (mlp.down_proj, None),
    }
    out = {
        prefix + "input_layernorm.weight": WeightTarget(layer.input_layernorm.weight),
        prefix + "post_attention_layernorm.weight": WeightTarget(layer.post_attention_layernorm.weight),
    }
    for name, (linear, rows) in fused.items():
        out[f"{prefix}{name}.weight"] = WeightTarget(linear.weight, rows)
        if linear.bias is not None:
            out[f"{prefix}{name}.bias"] = WeightTarget(linear.bias, rows)
    if attn.q_norm is not None and attn.k_norm is not None:
        out[prefix + "self_attn.q_norm.weight"] = WeightTarget(attn.q_norm.weight)
        out[prefix + "self_attn.k_norm.weight"] = WeightTarget(attn.k_norm.weight)
    return out


class MistralForCausalLM(LlamaForCausalLM):
    """Llama layout; only sliding_window differs, and an active window is refused in LlamaArgs.parse."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
