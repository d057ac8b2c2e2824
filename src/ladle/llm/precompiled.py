"""The compiled decoder's graphs as files: compiled once ahead of time (torch.compile's `aot_compile`), saved under
$LADLE_CACHE/compiled, and loaded by a later start in a couple of seconds instead of tracing the decoder again
(dynamo's trace alone took 15-20 s of a warm start with inductor's code already cached).

Two graphs per model, as vLLM buckets its decode shapes: one for a single token (batch-1 decode: dynamo specialises a
size of 1) and one for any other token count (decodes of several sequences, prefill chunks, mixed steps).

Keys: a graph file names everything it was compiled from — the model (architecture, config, dtype, weight format,
which attention and GEMM paths it runs), torch, Python, the CPU's flags and a digest of ladle's own LLM sources (a graph
whose guards pass can still embody old code). Anything else changes nothing, or fails the guards.

Guards: a loaded graph is checked against its model once, in full, when it is installed (every weight's shape, dtype
and strides: ~0.3 ms, too much for every step). Invariant this rests on: after a model is loaded nothing replaces its
tensors, so per step only the step's own inputs are checked (`Decoder.accepts`), and anything else runs eagerly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ladle.llm.compiled import compile_settings, step_metadata
from ladle.llm.kernels.build import cache_root, cpu_flags

if TYPE_CHECKING:
    from ladle.llm.attention import AttentionMetadata

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent  # ladle/llm: models, kernels and the ops the graphs call
BUCKETS = (1, 2)  # token counts the graphs are compiled at: exactly one, and two standing for any other
_graphs: dict[tuple[str, int], Any] = {}  # (key, bucket) -> graph, shared by every model of that key in the process
_lock = threading.Lock()  # one compile or load at a time (two engines starting at once would double the work)
UNUSED_DAYS = 30  # graph files not loaded for this long are deleted when a new one is saved (old ladles' and models')


class ProbeStep(NamedTuple):
    """A real step's inputs for the graphs (input_ids, positions, packed metadata) and its attention metadata (what
    the torch attention path reads while the step runs)."""

    args: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    meta: AttentionMetadata


def artifact_dir() -> Path:
    return cache_root() / "compiled"


@functools.cache
def sources_digest() -> str:
    """sha256 of ladle's LLM sources (Python, C, C++): a change to any of them may change what a graph computes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCES.rglob("*") if p.suffix in {".py", ".c", ".h", ".cpp"}):
        digest.update(str(path.relative_to(SOURCES)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def artifact_key(model_description: dict[str, Any]) -> str:
    """The key of a model's graphs: its description (JSON-serialisable) plus everything of the process that the
    generated code depends on."""
    where = {
        "model": model_description,
        "torch": torch.__version__,
        "python": sys.version,
        "cpu": hashlib.sha256(cpu_flags().encode()).hexdigest(),
        "ladle": sources_digest(),
    }
    return hashlib.sha256(json.dumps(where, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Decoder:
    """A model's compiled `hidden_states`: the one-token graph or the other, chosen by the step's token count."""

    def __init__(self, graphs: dict[int, Any]) -> None:
        self.one, self.many = graphs[1], graphs[2]

    @staticmethod
    def accepts(input_ids: torch.Tensor, positions: torch.Tensor) -> bool:
        """The step's inputs are what the graphs were compiled for (the runner always builds them so): 1-D int64,
        contiguous, as many positions as tokens, at least one token, under inference mode."""
        return (input_ids.dtype == torch.int64 and positions.dtype == torch.int64 and input_ids.dim() == 1
                and input_ids.shape == positions.shape and input_ids.shape[0] >= 1 and input_ids.is_contiguous()
                and positions.is_contiguous() and torch.is_inference_mode_enabled())

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 step: torch.Tensor | None) -> torch.Tensor:
        if not self.accepts(input_ids, positions):
            return model.hidden_states(input_ids, positions, step)
        graph = self.one if input_ids.shape[0] == 1 else self.many
        return graph.fn(model, input_ids, positions, step)  # guards were checked at install (see the module doc)


def build(model: torch.nn.Module, description: dict[str, Any], probe: Callable[[int], ProbeStep]
          ) -> tuple[Decoder, str]:
    """The model's Decoder, from this process's graphs, the files on disk, or a compile (saved for the next start);
    and where it came from ("memory", "cache" or "compiled"). `description["cpp_wrapper"]`: compile with inductor's
    C++ wrapper (compiled.cpp_wrapper). `probe(tokens)` gives a step's inputs for that many
    tokens (the graphs run on them once: a graph that fails there is never installed)."""
    key, use_cpp_wrapper = artifact_key(description), bool(description.get("cpp_wrapper"))
    graphs, origins = {}, set()
    with _lock:
        for bucket in BUCKETS:
            graphs[bucket], origin = _graph(key, bucket, model, probe(bucket), use_cpp_wrapper)
            origins.add(origin)
    for bucket in BUCKETS:  # outside the lock: another engine's install need not wait for these steps
        step = probe(bucket)
        with step_metadata(step.meta):
            graphs[bucket].fn(model, *step.args)
    origin = "compiled" if "compiled" in origins else "cache" if "cache" in origins else "memory"
    return Decoder(graphs), origin


def _graph(key: str, bucket: int, model: torch.nn.Module, step: ProbeStep, use_cpp_wrapper: bool
           ) -> tuple[Any, str]:
    """One bucket's graph whose guards pass for the model and a probe step."""
    args = (model, *step.args)
    graph = _graphs.get((key, bucket))
    if graph is not None and graph.guard_check(*args):
        return graph, "memory"
    path = artifact_dir() / f"{key}-{bucket}.bin"
    graph = _load(path, args)
    origin = "cache"
    if graph is None:
        graph, origin = _compile(path, step, args, use_cpp_wrapper), "compiled"
    _graphs[(key, bucket)] = graph
    return graph, origin


def _load(path: Path, args: tuple) -> Any | None:
    """The graph saved at `path` if it loads and its guards pass for `args`; None (logged) otherwise."""
    if not path.is_file():
        return None
    from torch._dynamo.aot_compile import AOTCompiledFunction

    started = time.perf_counter()
    try:
        graph = AOTCompiledFunction.deserialize(path.read_bytes())
        if graph.guard_check(*args):
            logger.info("compiled graph %s loaded in %.1fs", path.name, time.perf_counter() - started)
            path.touch()  # in use: see _prune
            return graph
        logger.warning("compiled graph %s does not fit this model (%s); compiling it again", path.name,
                       graph._artifacts.guard_manager.check_verbose(graph.prepare_f_locals(*args)).verbose_code_parts)
    except Exception as exc:  # a truncated or foreign file, or a torch that reads it differently: compile instead
        logger.warning("compiled graph %s did not load (%s: %s); compiling it again", path.name, type(exc).__name__,
                       exc)
    return None


class JitGraph:
    """torch.compile's ordinary (just-in-time) graph, for a torch whose compiled functions have no `aot_compile`
    (2.11 has none; the pinned 2.13 has it): traced in this process, guarded by dynamo on every call, never saved."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn

    def guard_check(self, *args: Any) -> bool:
        return True  # dynamo checks its own guards at each call and retraces when they fail


def aot_available(compiled: Callable[..., Any]) -> bool:
    return hasattr(compiled, "aot_compile")


def _compile(path: Path, step: ProbeStep, args: tuple, use_cpp_wrapper: bool) -> Any:
    """Compile one bucket's graph for `args` and save it (atomically: a half-written file is never read); on a torch
    without `aot_compile`, a JitGraph traced now on the probe `step` (its attention metadata set) and not saved."""
    model = args[0]
    started = time.perf_counter()
    compiled = torch.compile(type(model).hidden_states, dynamic=True, fullgraph=True)
    if not aot_available(compiled):
        logger.warning("torch %s cannot compile ahead of time (no aot_compile): the decoder is compiled at every "
                       "start, not saved (torch 2.13 saves it)", torch.__version__)
        with compile_settings(use_cpp_wrapper), step_metadata(step.meta):
            compiled(*args)  # traced (and run) now, not in a request's step
        return JitGraph(compiled)
    with compile_settings(use_cpp_wrapper):
        graph = compiled.aot_compile((args, {}))
    logger.info("compiled graph %s in %.1fs", path.name, time.perf_counter() - started)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        graph.save_compiled_function(str(path))
        _prune(path.parent)
    except Exception as exc:  # a read-only cache still serves this process
        logger.warning("compiled graph not saved to %s (%s: %s)", path, type(exc).__name__, exc)
    return graph


def _prune(folder: Path) -> None:
    """Delete graph files no start has loaded for UNUSED_DAYS (every upgrade of ladle or torch keys new ones)."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in folder.glob("*.bin"):
        if old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)


def forget() -> None:
    """Drop this process's graphs: the next build reads the files (or compiles), as a new process would."""
    with _lock:
        _graphs.clear()
