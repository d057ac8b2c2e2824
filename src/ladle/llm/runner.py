"""The model runner: owns the model and its paged KV cache, flattens a SchedulerOutput into one forward pass.

Invariant: the flat batch is ordered decodes-first (attention.py relies on it) while the returned logits rows follow
`sched.sampled_ids`. Step tensors are built with numpy once per step; nothing per token runs in Python.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ladle.llm.attention import AttentionMetadata, build_attention_metadata
from ladle.llm.compiled import configure_inductor, cpp_wrapper
from ladle.llm.kernels.paged import paged_attention_op, paged_decode
from ladle.llm.models.linear import can_prepack
from ladle.llm.models.loader import Checkpoint, load_model, read_json
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.precompiled import ProbeStep, artifact_dir, build
from ladle.llm.weight_arena import weights_on_huge_pages
from ladle.process import advise_huge_pages, tune_malloc_for_tensors

if TYPE_CHECKING:
    from ladle.llm.models.quant import QuantScheme

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInputs:
    """One step's device tensors: flat tokens and positions, attention metadata, and the rows to compute logits for."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        *,
        prepack: bool = True,
        compile: bool = False,
        quantization: QuantScheme | None = None,
        checkpoint: Checkpoint | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`model_dir`: a checkpoint directory or GGUF file (`checkpoint`, when already opened). `prepack`: use
        oneDNN-prepacked weights where that is faster (bfloat16 on a bf16-capable CPU). `quantization`: the linear
        layers' weight format (None: full width); the output head is then int8 (llama.cpp too keeps the head wide).
        `compile`: prepare for torch.compile (compiled.py): compile_decoder() then compiles. `kv_cache_dtype`: the
        cache's element type (None: the model's dtype); a narrower one stores keys/values rounded to it."""
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype, self.block_size = dtype, block_size
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        if self.device.type == "cpu":
            tune_malloc_for_tensors()
        loaded = load_model(self.model_dir, dtype, self.device, quantization, checkpoint)
        self.model, self.config, self.architecture = loaded.model, loaded.config, loaded.architecture
        self.quantization = quantization
        self.prepacked = prepack and quantization is None and can_prepack(dtype, self.device)
        if self.prepacked:
            self.model.prepack()
        if quantization is not None:
            self.model.set_head(self._quantized_head(quantization))
        if self.device.type == "cpu":  # before the KV cache (the heap's freed copies are returned first) and compiling
            weights_on_huge_pages(self.model)
        self.eos_token_ids: list[int] = read_eos_token_ids(self.model_dir, self.config)
        for token in getattr(loaded.checkpoint, "eos_token_ids", ()):
            if token not in self.eos_token_ids:
                self.eos_token_ids.append(token)
        self.max_model_len: int = self.model.max_model_len
        self.vocab_size: int = self.model.vocab_size
        self.num_blocks = self._resolve_num_blocks(num_blocks, kv_cache_memory)  # what the block pool hands out
        # torch.compile (compiled.py) compiles while requests may decode: its probe steps write into one extra block,
        # block id num_blocks, which no pool hands out
        self.compile_enabled = compile
        self.cache_blocks = self.num_blocks + int(compile)
        self.compile_state = "compiling" if compile else "off"
        self.compile_thread: threading.Thread | None = None
        m = self.model
        # One allocation for all layers, zeroed so that masked-out (padding) keys are finite: 0 * NaN poisons P @ V.
        shape = (m.num_layers, 2, m.num_kv_heads, self.cache_blocks, block_size, m.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
        if self.device.type == "cpu":  # huge pages asked for before the zeroing touches them
            advise_huge_pages(self.kv_cache.data_ptr(), self.kv_cache.nbytes)
        self.kv_cache.zero_()
        # Attention reads the cache in place: through the C++ operator (kernels/ops.cpp: one dispatch per layer) where
        # it builds, else the C kernel for decodes (ctypes) and torch for the rest. LADLE_ATTENTION=kernel keeps the
        # latter, =gather the torch path alone (it copies each sequence's context per layer): for comparison.
        heads = int(self.config.get("num_attention_heads") or self.config.get("n_head") or 0)  # 0: unknown, no kernel
        mode = os.environ.get("LADLE_ATTENTION", "operator")
        shape = (self.kv_cache_dtype, self.device, heads, m.num_kv_heads, m.head_dim)
        self.attention_op = paged_attention_op(*shape) if mode == "operator" else None
        self.decode_kernel = paged_decode(*shape) if self.attention_op is None and mode != "gather" else None
        # each layer's K and V as a tensor of its own over the same memory (storage offset 0): as views into the one
        # allocation they carry 2 x layers storage offsets, which the compiled graphs (dynamic=True) take as inputs,
        # read in Python and passed as tensors on every call: ~0.5 ms of a batch-1 step (benchmarks/RESULTS.md)
        own = torch.from_dlpack
        m.bind_kv_cache([(own(layer[0]), own(layer[1])) for layer in self.kv_cache], self.attention_op)
        logger.info(
            "%s: %d KV blocks of %d tokens (%.1f MB, %s)", self.architecture, self.num_blocks, block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 1e6, str(self.kv_cache_dtype).removeprefix("torch."),
        )

    def _quantized_head(self, scheme: QuantScheme) -> torch.nn.Module:
        """int8 even under int4: the head decides every token, and llama.cpp's Q4 files keep it at 6-8 bits too.
        Under int4 it takes the scheme's int8 kernel (int8-dynamic): torch's weight-only int8 kernel ran a
        32000 x 576 head at 1.75 ms per decode step, as slow as bf16 and 15% of an int4 step."""
        from ladle.llm.models.quant import QuantScheme, quantize_weight

        head = QuantScheme(scheme.int8_method, scheme.group_size) if scheme.method == "int4" else scheme
        return quantize_weight(self.model.lm_head_weight(), head)

    def compile_decoder(self, background: bool = True) -> threading.Thread | None:
        """Compile the decoder (when built with compile=True) and switch the model to it once both graphs exist (one
        token, and any other count: prefill shapes reuse the second). In the background the model keeps serving
        eagerly meanwhile; a failed compile is logged and leaves it eager."""
        if not self.compile_enabled:
            return None
        if not background:
            self._compile()
            return None
        self.compile_thread = threading.Thread(target=self._compile, name="ladle-compile", daemon=True)
        self.compile_thread.start()
        return self.compile_thread

    def _compile(self) -> None:
        started = time.perf_counter()
        logger.info("compiling the decoder with torch.compile (inductor; graphs kept in %s) ...", artifact_dir())
        try:
            configure_inductor()
            with torch.inference_mode():
                decoder, origin = build(self.model, self.graph_description(), self._probe)
        except Exception as exc:  # any failure of the compiler leaves the eager model serving
            self.compile_state = "failed"
            logger.warning("torch.compile failed, the decoder stays eager: %s: %s", type(exc).__name__, exc,
                           exc_info=True)
            return
        self.model.compiled = decoder
        self.compile_state = "compiled"
        how = {"compiled": "compiled", "cache": "loaded from the cache", "memory": "shared with a loaded model"}[origin]
        logger.info("decoder graphs %s in %.1fs; steps now run them", how, time.perf_counter() - started)

    def graph_description(self) -> dict[str, Any]:
        """What the compiled graphs depend on in this runner (precompiled.artifact_key adds torch, the CPU and ladle's
        sources): the model's shapes and the kind of every module (which GEMM and attention paths it runs)."""
        kinds = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in self.model.modules()})
        return {
            "architecture": self.architecture, "config": self.config, "dtype": str(self.dtype),
            "kv_cache_dtype": str(self.kv_cache_dtype),
            "device": self.device.type, "quantization": repr(self.quantization), "prepacked": self.prepacked,
            "attention": (self.attention_op is not None, self.decode_kernel is not None), "modules": kinds,
            "cpp_wrapper": cpp_wrapper(self.device),
        }

    def _probe(self, tokens: int) -> ProbeStep:
        """A step of one sequence feeding `tokens` tokens into the reserved block, whose contents are never read."""
        probe = ScheduledSeq("compile-probe", [1] * tokens, 0, [self.num_blocks], True)
        step = self.prepare_inputs(SchedulerOutput([probe], tokens))
        return ProbeStep((step.input_ids, step.positions, step.meta.packed), step.meta)

    @property
    def bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.kv_cache_dtype.itemsize

    def _resolve_num_blocks(self, num_blocks: int | None, kv_cache_memory: int | None) -> int:
        if num_blocks is None:
            if kv_cache_memory is None:
                raise ValueError("ModelRunner needs num_blocks or kv_cache_memory (bytes) to size the KV cache")
            num_blocks = kv_cache_memory // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={kv_cache_memory} bytes holds no KV block ({self.bytes_per_block} bytes each "
                f"for block_size={self.block_size}); raise it"
            )
        return int(num_blocks)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """float32 logits [len(sched.sampled_ids) + prompt rows, vocab]: sampled_ids order, then each scored
        prompt's positions (SchedulerOutput.scored_prompts)."""
        if sched.empty:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        step = self.prepare_inputs(sched)
        hidden = self._forward(step)
        return self.model.compute_logits(hidden.index_select(0, step.logits_indices))

    def _forward(self, step: StepInputs) -> torch.Tensor:
        compiled = self.model.compiled
        if compiled is None:
            return self.model(step.input_ids, step.positions, step.meta)
        try:
            return self.model(step.input_ids, step.positions, step.meta)
        except Exception as exc:
            failure = exc
        # rerun eagerly (K/V go to the same slots again); if that fails too, the step itself is at fault: it raises and
        # the compiled graphs stay
        self.model.compiled = None
        try:
            hidden = self.model(step.input_ids, step.positions, step.meta)
        except Exception:
            self.model.compiled = compiled
            raise
        self.compile_state = "failed"
        logger.error("a compiled step failed (%s: %s) where the eager one succeeds; the decoder runs eagerly from now "
                     "on", type(failure).__name__, failure)
        return hidden

    def time_step(self, num_seqs: int, tokens_per_seq: int, context: int = 256, repeat: int = 2) -> float | None:
        """Best-of-`repeat` seconds of a step feeding num_seqs sequences tokens_per_seq tokens each after `context`
        cached tokens (capped by the context window). Only for start-up measurements: it writes K/V into blocks no
        request owns yet (every sequence the same ones: their contents do not matter to the time). None when the
        step limits cannot hold that shape."""
        context = min(context, self.max_model_len, self.num_blocks * self.block_size) - tokens_per_seq
        num_blocks = -(-(context + tokens_per_seq) // self.block_size)
        if context < 1 or num_seqs > self.max_num_seqs or num_seqs * tokens_per_seq > self.max_num_batched_tokens:
            return None
        blocks = list(range(num_blocks))
        seqs = [ScheduledSeq(f"probe-{i}", [1] * tokens_per_seq, context, blocks, True) for i in range(num_seqs)]
        sched = SchedulerOutput(seqs, num_seqs * tokens_per_seq)
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            self.execute(sched)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - started)
        return best

    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        seqs = sched.seqs
        lengths = np.fromiter((s.num_tokens for s in seqs), np.int64, len(seqs))
        order = np.argsort(lengths != 1, kind="stable")  # decodes first, otherwise scheduler order
        ordered = [seqs[i] for i in order]
        num_tokens = lengths[order]
        starts = np.fromiter((s.start_pos for s in ordered), np.int64, len(ordered))
        ends = np.cumsum(num_tokens)
        total = int(ends[-1])
        token_seq = np.repeat(np.arange(len(ordered)), num_tokens)
        positions = np.arange(total) + np.repeat(starts - (ends - num_tokens), num_tokens)
        block_table = self._block_table(ordered)
        self._validate(ordered, starts + num_tokens, block_table, total)
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in ordered), np.int64, total)
        meta = build_attention_metadata(
            positions, token_seq, num_tokens, block_table, int((num_tokens == 1).sum()),
            (self.model.num_kv_heads, self.cache_blocks, self.block_size), self.dtype, self.device, self.decode_kernel,
            operator=self.attention_op is not None,
        )
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))  # original index -> position in the ordered batch
        sampled = np.fromiter((s.sample for s in seqs), bool, len(seqs))
        logits_rows = (ends - 1)[rank[sampled]]
        if sched.num_spec_tokens:  # each verified draft token's position gets logits too, in position order
            counts = np.fromiter((s.num_rows for s in seqs if s.sample), np.int64, len(logits_rows))
            logits_rows = np.repeat(logits_rows - counts + 1, counts) + _ranges(counts)
        if scored := [(i, s.prompt_logits) for i, s in enumerate(seqs) if s.prompt_logits]:
            first_row = (ends - num_tokens)[rank]  # original index -> its first row in the flat batch
            logits_rows = np.concatenate([logits_rows, *(first_row[i] + np.arange(r.start, r.stop) for i, r in scored)])
        return StepInputs(self._to_device(input_ids), self._to_device(positions), meta, self._to_device(logits_rows))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _block_table(self, seqs: list[ScheduledSeq]) -> np.ndarray:
        """[S, max_blocks] int64, padded with block 0 (finite data; padded keys are masked out)."""
        table = np.zeros((len(seqs), max(len(s.block_ids) for s in seqs)), np.int64)
        for row, seq in zip(table, seqs, strict=True):
            row[: len(seq.block_ids)] = seq.block_ids
        return table

    def _validate(self, seqs: list[ScheduledSeq], context: np.ndarray, table: np.ndarray, total: int) -> None:
        """Cheap checks of the scheduler contract; a violation here would silently corrupt other requests' KV."""
        capacity = np.fromiter((len(s.block_ids) for s in seqs), np.int64, len(seqs)) * self.block_size
        problems = []
        if (context > capacity).any():
            problems.append(f"block tables too short: context {context.tolist()}, capacity {capacity.tolist()}")
        if (context > self.max_model_len).any():
            problems.append(f"context length {int(context.max())} exceeds max_model_len {self.max_model_len}")
        if table.size and (table.min() < 0 or table.max() >= self.cache_blocks):
            problems.append(f"block ids must be in [0, {self.cache_blocks})")
        if total > self.max_num_batched_tokens or len(seqs) > self.max_num_seqs:
            problems.append(
                f"{total} tokens / {len(seqs)} seqs exceed max_num_batched_tokens={self.max_num_batched_tokens} "
                f"/ max_num_seqs={self.max_num_seqs}"
            )
        if problems:
            raise ValueError("invalid scheduled batch: " + "; ".join(problems))


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(c) for c in counts), without a Python loop."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def read_eos_token_ids(model_dir: Path, config: dict) -> list[int]:
    """EOS ids from generation_config.json (if present) and config.json, de-duplicated, generation config first."""
    sources = [config]
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        sources.insert(0, read_json(gen_path))
    ids: list[int] = []
    for source in sources:
        value = source.get("eos_token_id")
        for token in [value] if isinstance(value, int) else value or []:
            if token not in ids:
                ids.append(int(token))
    return ids
