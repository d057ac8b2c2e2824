"""Building a ready-to-start AsyncEngine from an LLMConfig: resolve the checkpoint, pick device and
dtype, size the KV cache, and wire runner, block pool, scheduler and tokenizer together.

Invariant: everything a bad configuration can get wrong fails here, at start-up, with a message.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ladle.config import LLMConfig, parse_bytes
from ladle.extras import raise_missing_extra
from ladle.llm.kv_cache import BlockPool, KVCacheManager
from ladle.llm.scheduler import Scheduler
from ladle.metrics import LLMMetricFamilies, LLMMetrics
from ladle.process import pin_torch_threads

try:  # the llm extra's packages: a core install is told which extra to add, not which module was first missing
    import torch

    from ladle.llm.async_engine import AsyncEngine
    from ladle.llm.engine import EngineCore
    from ladle.llm.runner import ModelRunner
    from ladle.llm.structured import StructuredOutputs
    from ladle.llm.tokenizer import Tokenizer
except ModuleNotFoundError as exc:
    raise_missing_extra("llm", "serving an LLM", exc)
    raise

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded with huggingface_hub where a network exists."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")):
        raise FileNotFoundError(f"--model {model}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub ...", model)
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise FileNotFoundError(f"--model {model}: no such directory, and the hub download failed: {exc}") from None


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return name


def build_engine(config: LLMConfig, name: str, model_dir: Path, families: LLMMetricFamilies | None) -> AsyncEngine:
    """Load the checkpoint and build the engine (blocking: call off the event loop)."""
    started = time.monotonic()
    tokenizer = Tokenizer.from_dir(model_dir)
    metrics = LLMMetrics(families, name) if families is not None else None
    engine = AsyncEngine(name, lambda: build_core(config, model_dir, tokenizer), tokenizer, metrics, config)
    runner = engine.core.runner
    log.info(
        "LLM %s (%s, %s on %s) ready in %.1fs: context %d tokens, %d KV blocks of %d tokens",
        name, runner.architecture, str(runner.dtype).removeprefix("torch."), runner.device,
        time.monotonic() - started, engine.info.max_model_len, runner.num_blocks, config.block_size,
    )
    return engine


def build_core(config: LLMConfig, model_dir: Path, tokenizer: Tokenizer | None = None) -> EngineCore:
    """Runner, block pool, scheduler: what the engine thread steps (built on that thread)."""
    pin_torch_threads(config.num_threads, "an LLM engine")  # this is the engine thread: the count stays its own
    dtype = DTYPES["bfloat16" if config.dtype == "auto" else config.dtype]
    runner = ModelRunner(
        model_dir, dtype=dtype, device=pick_device(config.device), block_size=config.block_size,
        num_blocks=config.num_kv_blocks,
        kv_cache_memory=None if config.num_kv_blocks else parse_bytes(config.kv_cache_memory),
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
    )
    max_model_len = min(config.max_model_len or runner.max_model_len, runner.max_model_len)
    pool = BlockPool(runner.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
    scheduler = Scheduler(
        KVCacheManager(pool, max_model_len), max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=config.enable_chunked_prefill,
    )
    structured = StructuredOutputs(tokenizer.hf, runner.vocab_size) if tokenizer is not None else None
    return EngineCore(runner, scheduler, structured)
