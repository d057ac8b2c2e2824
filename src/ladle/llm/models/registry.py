"""HF `architectures` name -> ladle model class. The one place a new model family is registered.

An architecture not listed here is refused with the list of those that are.
"""

from __future__ import annotations

from typing import Any

from ladle.llm.models.gpt2 import GPT2LMHeadModel
from ladle.llm.models.layers import CausalLM, UnsupportedModelError
from ladle.llm.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def resolve_architecture(config: dict[str, Any]) -> tuple[str, type[CausalLM]]:
    """The first of config.json's `architectures` that ladle implements, else a clear refusal."""
    names = config.get("architectures") or []
    for name in names:
        if name in MODEL_REGISTRY:
            return name, MODEL_REGISTRY[name]
    raise UnsupportedModelError(
        f"unsupported model architecture {names or '(config.json has no `architectures`)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
