"""GPT-2 (GPT2LMHeadModel) over a paged KV cache: learned positions, pre-LayerNorm blocks, fused c_attn, MHA.

Checkpoint Conv1D weights are stored [in, out]; they are transposed once at load into nn.Linear's [out, in].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ladle.llm import compiled
from ladle.llm.models.layers import CausalLM, WeightTarget, cfg_get, require
from ladle.llm.models.linear import Linear

_GELU_APPROX = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPT2Args:
    hidden: int
    layers: int
    heads: int
    inner: int
    vocab: int
    positions: int
    eps: float
    gelu_approximate: str
    scale_attn: bool

    @classmethod
    def parse(cls, cfg: dict[str, Any]) -> GPT2Args:
        act = cfg.get("activation_function", "gelu_new")
        require(act in _GELU_APPROX, f"activation_function={act!r} is not supported (supported: {list(_GELU_APPROX)})")
        require(not cfg.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx is not supported")
        require(not cfg.get("add_cross_attention"), "GPT-2 with cross-attention is not supported")
        hidden = cfg_get(cfg, "n_embd", "hidden_size")
        return cls(
            hidden=hidden,
            layers=cfg_get(cfg, "n_layer", "num_hidden_layers"),
            heads=cfg_get(cfg, "n_head", "num_attention_heads"),
            inner=cfg_get(cfg, "n_inner", default=4 * hidden),
            vocab=cfg["vocab_size"],
            positions=cfg_get(cfg, "n_positions", "max_position_embeddings", default=1024),
            eps=cfg_get(cfg, "layer_norm_epsilon", default=1e-5),
            gelu_approximate=_GELU_APPROX[act],
            scale_attn=cfg.get("scale_attn_weights", True),
        )


class GPT2Block(nn.Module):
    def __init__(self, a: GPT2Args) -> None:
        super().__init__()
        self.heads, self.head_dim, self.hidden = a.heads, a.hidden // a.heads, a.hidden
        self.ln_1 = nn.LayerNorm(a.hidden, eps=a.eps)
        self.c_attn = Linear(a.hidden, 3 * a.hidden, bias=True)
        self.attn_proj = Linear(a.hidden, a.hidden, bias=True)
        self.ln_2 = nn.LayerNorm(a.hidden, eps=a.eps)
        self.c_fc = Linear(a.hidden, a.inner, bias=True)
        self.mlp_proj = Linear(a.inner, a.hidden, bias=True)
        self.gelu_approximate = a.gelu_approximate
        self.scale = self.head_dim**-0.5 if a.scale_attn else 1.0
        self.k_cache = self.v_cache = torch.empty(0)
        self.paged_op: Callable[..., torch.Tensor] | None = None  # kernels/ops.cpp's attention, when bound
        self.handle = compiled.register(self)  # how a compiled decoder's Python attention op finds this block's cache

    def forward(self, x: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.c_attn(self.ln_1(x)).view(tokens, 3, self.heads, self.head_dim)
        attn = compiled.attention(self, qkv[:, 0], qkv[:, 1], qkv[:, 2], step)
        x = self.attn_proj.add(attn, x)
        return self.mlp_proj.add(self.c_fc.gelu(self.ln_2(x), self.gelu_approximate), x)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        a = GPT2Args.parse(config)
        self.num_layers, self.num_kv_heads, self.head_dim = a.layers, a.heads, a.hidden // a.heads
        self.vocab_size, self.max_model_len = a.vocab, a.positions
        self.wte = nn.Embedding(a.vocab, a.hidden)
        self.wpe = nn.Embedding(a.positions, a.hidden)
        self.h = nn.ModuleList(GPT2Block(a) for _ in range(a.layers))
        self.ln_f = nn.LayerNorm(a.hidden, eps=a.eps)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, step: torch.Tensor | None
                      ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, step)
        return self.ln_f(x)

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight  # GPT-2 always ties the output projection to the token embedding

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]],
                      op: Callable[..., torch.Tensor] | None = None) -> None:
        for block, (k_cache, v_cache) in zip(self.h, caches, strict=True):
            block.k_cache, block.v_cache, block.paged_op = k_cache, v_cache, op

    def canonical_name(self, name: str) -> str:
        # The original OpenAI checkpoints name tensors without the "transformer." prefix.
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name

    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        return (".attn.bias", ".attn.masked_bias", "lm_head.weight")

    def checkpoint_layout(self) -> dict[str, WeightTarget]:
        out = {
            "transformer.wte.weight": WeightTarget(self.wte.weight),
            "transformer.wpe.weight": WeightTarget(self.wpe.weight),
            "transformer.ln_f.weight": WeightTarget(self.ln_f.weight),
            "transformer.ln_f.bias": WeightTarget(self.ln_f.bias),
        }
        for i, block in enumerate(self.h):
            modules = {  # name -> (module, stored as Conv1D [in, out])
                "ln_1": (block.ln_1, False),
                "attn.c_attn": (block.c_attn, True),
                "attn.c_proj": (block.attn_proj, True),
                "ln_2": (block.ln_2, False),
                "mlp.c_fc": (block.c_fc, True),
                "mlp.c_proj": (block.mlp_proj, True),
            }
            for name, (module, conv1d) in modules.items():
                out[f"transformer.h.{i}.{name}.weight"] = WeightTarget(module.weight, transpose=conv1d)
                out[f"transformer.h.{i}.{name}.bias"] = WeightTarget(module.bias)
        return out
