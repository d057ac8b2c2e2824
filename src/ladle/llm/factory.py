"""Building a ready-to-start AsyncEngine from an LLMConfig: resolve the checkpoint, pick device, dtype and weight
quantization, size the KV cache, and wire runner, block pool, scheduler and tokenizer together.

Invariant: everything a bad configuration can get wrong fails here, at start-up, with a message.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ladle.config import LLMConfig, parse_bytes
from ladle.extras import raise_missing_extra
from ladle.llm.kv_cache import RESERVE_AHEAD, BlockPool, KVCacheManager
from ladle.llm.scheduler import Scheduler
from ladle.metrics import LLMMetricFamilies, LLMMetrics
from ladle.process import pin_torch_threads
from ladle.windows import RequestWindow

try:  # the llm extra's packages: a core install is told which extra to add, not which module was first missing
    import torch

    from ladle.llm.async_engine import AsyncEngine
    from ladle.llm.dtypes import resolve_dtype, resolve_kv_cache_dtype
    from ladle.llm.engine import EngineCore
    from ladle.llm.models.gguf import GGUFCheckpoint
    from ladle.llm.models.linear import tiled_gemm_runs
    from ladle.llm.models.loader import Checkpoint, open_checkpoint
    from ladle.llm.models.quant import QuantizationError, QuantScheme, describe, resolve_scheme
    from ladle.llm.runner import ModelRunner
    from ladle.llm.spec.setup import build_spec_core, spec_config
    from ladle.llm.structured import StructuredOutputs
    from ladle.llm.tokenizer import Tokenizer
except ModuleNotFoundError as exc:
    raise_missing_extra("llm", "serving an LLM", exc)
    raise

log = logging.getLogger(__name__)


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded with huggingface_hub where a network exists."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists() or model.startswith((".", "/")):
        raise FileNotFoundError(f"--model {model}: not a checkpoint directory or .gguf file")
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


def build_engine(config: LLMConfig, name: str, model_dir: Path, families: LLMMetricFamilies | None,
                 version: str = "1", window: RequestWindow | None = None) -> AsyncEngine:
    """Load the checkpoint (a directory or a GGUF file) and build the engine (blocking: call off the event loop).
    Its metrics carry `version`; its finished requests are recorded into `window` (the version's, for rollouts)."""
    started = time.monotonic()
    spec_config(config)  # a bad speculation option fails before the checkpoint loads
    background_caps(config)
    checkpoint = open_checkpoint(model_dir)
    tokenizer = load_tokenizer(checkpoint)
    metrics = LLMMetrics(families, name, version, window) if families is not None else None
    engine = AsyncEngine(name, lambda: build_core(config, model_dir, tokenizer, checkpoint), tokenizer, metrics, config)
    runner = engine.core.runner
    log.info(
        "LLM %s (%s, %s%s on %s) ready in %.1fs: context %d tokens, %d KV blocks of %d tokens (%s)",
        name, runner.architecture, str(runner.dtype).removeprefix("torch."),
        f", {describe(runner.quantization)}" if runner.quantization else "", runner.device,
        time.monotonic() - started, engine.info.max_model_len, runner.num_blocks, config.block_size,
        str(runner.kv_cache_dtype).removeprefix("torch."),
    )
    return engine


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    if isinstance(checkpoint, GGUFCheckpoint):
        return Tokenizer(checkpoint.tokenizer(), checkpoint.eos_token_ids, name=checkpoint.path.stem)
    return Tokenizer.from_dir(checkpoint.path)


def build_core(
    config: LLMConfig, model_dir: Path, tokenizer: Tokenizer | None = None, checkpoint: Checkpoint | None = None,
) -> EngineCore:
    """Runner, block pool, scheduler: what the engine thread steps (built on that thread)."""
    pin_torch_threads(config.num_threads, "an LLM engine")  # this is the engine thread: the count stays its own
    checkpoint = checkpoint or open_checkpoint(model_dir)
    device = torch.device(pick_device(config.device))
    full_width = config.quantization == "none" or (config.quantization == "auto" and not checkpoint.quantized)
    bf16_gemm = full_width and tiled_gemm_runs(torch.bfloat16, device)
    dtype, why = resolve_dtype(config.dtype, checkpoint.config, device, checkpoint.quantized, bf16_gemm)
    log.info("dtype %s (%s)", str(dtype).removeprefix("torch."), why)
    scheme = choose_quantization(config, checkpoint, dtype, device)
    kv_dtype, kv_why = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, scheme is not None, device)
    if kv_dtype != dtype:
        log.info("KV cache %s (%s)", str(kv_dtype).removeprefix("torch."), kv_why)
    runner = ModelRunner(
        model_dir, dtype=dtype, device=str(device), block_size=config.block_size,
        num_blocks=config.num_kv_blocks,
        kv_cache_memory=None if config.num_kv_blocks else parse_bytes(config.kv_cache_memory),
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        quantization=scheme, checkpoint=checkpoint, compile=not enforce_eager(config),
        kv_cache_dtype=kv_dtype,
    )
    max_model_len = min(config.max_model_len or runner.max_model_len, runner.max_model_len)
    pool = BlockPool(runner.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
    background_max_seqs, background_max_tokens = background_caps(config)
    scheduler = Scheduler(
        KVCacheManager(pool, max_model_len, RESERVE_AHEAD), max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=config.enable_chunked_prefill,
        background_max_seqs=background_max_seqs, background_max_tokens=background_max_tokens,
        background_hold_s=BACKGROUND_HOLD_S, isolate_admissions=True,
    )
    structured = StructuredOutputs(tokenizer.hf, runner.vocab_size) if tokenizer is not None else None
    spec = spec_config(config)
    core = EngineCore(runner, scheduler, structured) if spec is None else build_spec_core(
        config, spec, runner, scheduler, structured, tokenizer)
    runner.compile_decoder(background=True)  # after the speculation policy's start-up timing, which it would skew
    return core


def enforce_eager(config: LLMConfig) -> bool:
    """--enforce-eager / --no-enforce-eager, else LADLE_ENFORCE_EAGER (1/true: the test suite's default), else
    compile."""
    if config.enforce_eager is not None:
        return config.enforce_eager
    return os.environ.get("LADLE_ENFORCE_EAGER", "").lower() in ("1", "true", "yes")


DEFAULT_BATCH_SHARE = 1 / 32  # measured: benchmarks/RESULTS.md, "Batch path"
#: the batch caps stay on this long after the last real-time request left (scheduler.py says why)
BACKGROUND_HOLD_S = 10.0


def background_caps(config: LLMConfig) -> tuple[int, int]:
    """(seats, tokens per step) that batch-job work may hold while real-time requests are present: --batch-share of
    --max-num-seqs and of --max-num-batched-tokens, at least one of each."""
    share = DEFAULT_BATCH_SHARE if config.batch_share is None else config.batch_share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise ValueError(f"batch_share must be a number in (0, 1], got {share!r}")
    return max(1, int(config.max_num_seqs * share)), max(1, int(config.max_num_batched_tokens * share))


def choose_quantization(
    config: LLMConfig, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device
) -> QuantScheme | None:
    """--quantization resolved for this checkpoint and host. auto keeps a GGUF's own width: Q4_x -> int4 (int8
    where int4 would be slower here), other quantized types -> int8; a float checkpoint stays full width."""
    requested = config.quantization
    if requested == "auto":
        if not checkpoint.quantized:
            return None
        requested = "int4" if gguf_mostly_4bit(checkpoint) else "int8"
        if requested == "int4":
            try:
                return resolve_scheme("int4", dtype, device, config.quantization_group_size)
            except QuantizationError as e:
                log.info("quantization auto: int8 instead of int4 for this Q4 GGUF (%s)", e)
                requested = "int8"
    if requested == "none":
        return None
    return resolve_scheme(requested, dtype, device, config.quantization_group_size)


def gguf_mostly_4bit(checkpoint: Checkpoint) -> bool:
    """Whether most of a GGUF's quantized tensors are 4-bit (Q4_0/Q4_1/Q4_K; a Q4_K_M file mixes in Q6_K).
    Only GGUF checkpoints hold quantized tensors."""
    assert isinstance(checkpoint, GGUFCheckpoint), "only a GGUF checkpoint is quantized"
    kinds = [t for t in checkpoint.tensor_types.values() if t.startswith(("Q", "IQ"))]
    return sum(t.startswith("Q4") for t in kinds) * 2 > len(kinds)
