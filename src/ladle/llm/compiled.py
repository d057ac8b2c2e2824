"""The decoder compiled with torch.compile (inductor): everything between the GEMMs and attention — RMSNorm and the
residual stream, rotary embedding, activations, reshapes — fused into a few generated kernels per layer, and the
model's Python between ops gone from the step.

How: ladle's C++ operators (kernels/ops.cpp: the tiled GEMM and paged attention, which reads the step from its
packed metadata tensor, a graph input) and oneDNN-prepacked GEMMs (inductor's lowering of them is turned into a plain
call) are called as they are. Quantized GEMMs (their packed weights are opaque objects) enter the graph as the Python
custom op `ladle::linear`, naming their module by a process-wide handle; so does torch's attention path
(`ladle::attention`) where the C++ operators are missing, reading the step's metadata from a context variable the
runner sets around the forward (`step_metadata`). Either way one graph serves every step — decodes, prefill chunks,
mixed — with the token count as its only dynamic size (dynamo specialises T == 1, the batch-1 decode, into a second
graph of its own: the two "buckets").

The graphs themselves are compiled ahead of time and kept as files by precompiled.py; inductor's FX graph cache under
$LADLE_CACHE/inductor (configured here) still spares code generation when only a graph file is missing.

Invariant: eager and compiled forwards run the same module methods on the same weights; nothing here changes what a
layer computes, only how the elementwise work between the opaque calls is scheduled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ladle.llm.attention import paged_attention
from ladle.llm.kernels.build import cache_root

if TYPE_CHECKING:
    from ladle.llm.attention import AttentionMetadata

logger = logging.getLogger(__name__)

_modules: dict[int, weakref.ref] = {}
_next_handle = iter(range(1, 1 << 62))
_lock = threading.Lock()
_metadata: ContextVar[AttentionMetadata] = ContextVar("ladle_step_metadata")
# torch writes its default into the environment at the first cache lookup (which loading a model can trigger), so
# whether the user chose a directory is read here, at import
_user_inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
_configured = False


def register(module: torch.nn.Module) -> torch.Tensor:
    """The handle a compiled graph names `module` by (a weak reference: an unloaded model's weights are freed). A
    0-dim tensor, not an int: tensors are graph inputs, so another model of the same shapes (a reload, a second
    version) runs the same graphs, and the graph on disk does not depend on load order; an int would be a constant,
    each model a recompile and a new cache entry."""
    with _lock:
        handle = next(_next_handle)
        _modules[handle] = weakref.ref(module, lambda _ref, h=handle: _modules.pop(h, None))
    # on the CPU whatever the default device: models are built under torch.device("meta") before loading, and a
    # meta handle would send the op to its shape function at run time
    return torch.tensor(handle, dtype=torch.int64, device="cpu")


def _module(handle: torch.Tensor) -> Any:
    module = _modules.get(int(handle))
    target = module() if module is not None else None
    if target is None:
        raise RuntimeError(f"compiled model refers to module {int(handle)}, which no longer exists")
    return target


@contextlib.contextmanager
def step_metadata(meta: AttentionMetadata) -> Iterator[None]:
    """The attention metadata of the step running inside this block (what `ladle::attention` reads)."""
    token = _metadata.set(meta)
    try:
        yield
    finally:
        _metadata.reset(token)


# --- the opaque ops ----------------------------------------------------------------------------------------------


@torch.library.custom_op("ladle::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, other: torch.Tensor | None, handle: torch.Tensor, width: int, method: str, arg: str
) -> torch.Tensor:
    return _call(_module(handle), method, x, other, arg)


@_linear_op.register_fake
def _(x: torch.Tensor, other: torch.Tensor | None, handle: torch.Tensor, width: int, method: str, arg: str
      ) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], width))


@torch.library.custom_op("ladle::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    layer = _module(handle)
    return paged_attention(q, k, v, layer.k_cache, layer.v_cache, _metadata.get(), layer.scale)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


def _call(module: Any, method: str, x: torch.Tensor, other: torch.Tensor | None, arg: str) -> torch.Tensor:
    if method == "add":
        return module.add(x, other)
    if method == "gelu":
        return module.gelu(x, arg)
    return getattr(module, method)(x)


def linear(module: Any, method: str, x: torch.Tensor, other: torch.Tensor | None = None, arg: str = "") -> torch.Tensor:
    """`module.<method>(x[, other | arg])`, as one opaque op when traced. Linear modules route their methods
    through this only while compiling (`opaque_method`); eager calls never pay for the dispatcher."""
    return _linear_op(x, other, module.handle, module.out_width(method), method, arg)


def attention(layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: torch.Tensor | None
              ) -> torch.Tensor:
    """Paged attention of `layer` (which has k_cache, v_cache, scale, paged_op and a handle) over the step: through
    the C++ operator when the layer has it (it reads `step`, the packed metadata: one dispatch, compiled or not),
    else torch's path (attention.py) with the metadata of step_metadata, behind a Python custom op when traced."""
    if layer.paged_op is not None:
        return layer.paged_op(q, k, v, layer.k_cache, layer.v_cache, step, layer.scale)
    if torch.compiler.is_dynamo_compiling():  # see opaque_method
        return _attention_op(q, k, v, layer.handle)
    return paged_attention(q, k, v, layer.k_cache, layer.v_cache, _metadata.get(), layer.scale)


def _traces_through(module: Any, method: str, x: torch.Tensor) -> bool:
    """Whether the module says `method` on x is traceable as it is (one C++ op with a shape function, e.g. ladle's
    int8 GEMM): then the graph calls that op directly, without the Python round trip of `ladle::linear`."""
    check = getattr(module, "traceable", None)
    return check is not None and bool(check(x, method))


def opaque_method(method: Callable) -> Callable:
    """Decorate a linear module's forward/add/gelu/swiglu: traced, the call becomes `ladle::linear` (the module must
    set `self.handle = register(self)` and answer `out_width(method)`)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        # is_dynamo_compiling(), not is_compiling(): the latter is one process-wide flag, True in every thread while
        # any thread compiles, so an eager step on the engine thread during a background compile took the traced
        # branch, and the op's own eager call of this method took it again, recursing without end (int8 served 500s)
        if torch.compiler.is_dynamo_compiling() and not _traces_through(self, name, x):
            other = args[0] if name == "add" else None
            arg = args[0] if name == "gelu" else ""
            return linear(self, name, x, other, arg)
        return method(self, x, *args)

    return wrapper


# --- compiling a model -------------------------------------------------------------------------------------------


def inductor_cache_dir() -> Path:
    """TORCHINDUCTOR_CACHE_DIR when the user set it, else $LADLE_CACHE/inductor (~/.cache/ladle/inductor)."""
    return Path(_user_inductor_dir) if _user_inductor_dir else cache_root() / "inductor"


def configure_inductor() -> None:
    """Before compiling; once per process (two engines may start compiling at once)."""
    global _configured
    with _lock:
        if not _configured:
            _configure_inductor_once()
            _configured = True


def _configure_inductor_once() -> None:
    """Persistent caches (the FX graph and AOT autograd caches key on the graph, torch version and CPU), set
    before the first compile; an explicit TORCHINDUCTOR_CACHE_DIR wins."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _user_inductor_dir or str(inductor_cache_dir())
    _call_onednn_linears_as_they_are()


def cpp_wrapper(device: torch.device) -> bool:
    """Whether the graphs call their kernels from C++ (inductor's cpp_wrapper) rather than generated Python: on the
    CPU it saves ~1 ms of a batch-1 decode step (~150 kernel calls), and costs a C++ compile of ~1-2 min the first
    time a model's graphs are built (kept on disk with them after, precompiled.py). LADLE_CPP_WRAPPER=0/1 decides
    instead; other devices keep the Python wrapper unless asked."""
    setting = os.environ.get("LADLE_CPP_WRAPPER", "").strip()
    return setting == "1" if setting in ("0", "1") else device.type == "cpu"


@contextlib.contextmanager
def compile_settings(use_cpp_wrapper: bool) -> Iterator[None]:
    """Around each compile, on its own thread: torch's compiler settings set in one thread are not seen in another
    (a setting made once in the first compile's thread was missing from the next engine's)."""
    import torch._inductor.config as inductor_config

    # eps and scales are constants of the model: traced as symbols (dynamic=True's default) dynamo restarts to
    # specialise them, which torch.compile absorbs (doubling the trace) and aot_compile does not (it fails)
    with torch._dynamo.config.patch(specialize_float=True), \
            inductor_config.patch(fx_graph_cache=True, cpp_wrapper=use_cpp_wrapper):
        yield


def _call_onednn_linears_as_they_are() -> None:
    """Prepacked linears (models/linear.py) call oneDNN's fused linear ops on weights packed at load. Inductor's own
    lowering of those ops expects weights it packed itself (freezing) and refuses ours; as plain fallback calls they
    cost one dispatch each from the generated code (a custom op around them cost ~30 us of Python per call)."""
    from torch._inductor import lowering

    for op in (torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary):
        lowering.lowerings.pop(op, None)
        lowering.make_fallback(op)
    # torch registers shapes for the unary variant only (its own passes create the binary one after tracing)
    torch.library.register_fake("mkldnn::_linear_pointwise.binary")(_linear_binary_shape)


def _linear_binary_shape(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         attr: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
