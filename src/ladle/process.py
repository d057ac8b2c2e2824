"""Process-wide state, decided in one place: torch's CPU thread counts, the Hugging Face offline switch, glibc
malloc tuning and the GC freeze after loading.

Invariant: no model can change another model's threading. A model's `num_threads` (`--num-threads` for the
engine) applies to the threads that run it; every other thread keeps the process default (torch's own).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_threads_lock = threading.Lock()
_default_threads: int | None = None


def configure_process(llm_model: str | None = None) -> None:
    """Start-up: the process-wide settings that must precede any model load (and reach worker processes, which
    inherit the environment). A hub id given to `--model` keeps the hub online so that it can be downloaded."""
    if llm_model is None or Path(llm_model).expanduser().is_dir():
        hub_offline()


def hub_offline() -> None:
    """Models are never downloaded while loading: huggingface_hub reads this once, when it is first imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pin_torch_threads(count: int | None, who: str) -> None:
    """Give the calling thread (a model's instance thread, or an engine thread) `count` torch intra-op threads.

    torch keeps the count per thread (OpenMP's and MKL's settings are per thread) plus one process-wide value that
    each thread copies at its first parallel op: measured with torch 2.13, a bare `torch.set_num_threads(3)` on one
    thread also became the count of every thread that had not run a parallel op yet (another model's, the event
    loop's). So the count is set and taken at once on this thread, then the process value is put back from a
    short-lived thread of its own. `None`: the model asked for nothing; its threads use the process default.
    """
    if count is None:
        return
    import torch

    global _default_threads
    with _threads_lock:
        if _default_threads is None:
            _default_threads = _on_fresh_thread(torch.get_num_threads)
        torch.set_num_threads(count)
        torch.get_num_threads()  # this thread's first parallel query copies the process value: count, now
        _on_fresh_thread(torch.set_num_threads, _default_threads)
    cores = os.cpu_count() or 1
    log.info("%s: %d torch thread(s) on its own thread (other threads: %d)", who, count, _default_threads)
    if count > cores:
        log.warning("%s asks for %d torch threads on %d cores: its threads will contend with each other",
                    who, count, cores)


def _on_fresh_thread(fn: Callable[..., Any], *args: Any) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), name="ladle-torch-threads")
    thread.start()
    thread.join()
    return result[0]


def freeze_loaded_objects() -> None:
    """After the start-up loads: loading leaves ~200k long-lived objects; freezing them keeps full GC passes
    (80-100 ms pauses at p99, measured) off the request path."""
    gc.collect()
    gc.freeze()


MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def advise_huge_pages(address: int, size: int) -> bool:
    """Ask Linux to back the 2 MiB-aligned pages inside [address, address + size) with transparent huge pages, before
    they are first touched (THP's default mode, `madvise`, gives them only to regions that ask). For the KV cache:
    attention reads each sequence's blocks scattered over it, and with 4 KiB pages nearly every block is a TLB miss
    (measured: decode attention at batch 32 ~10% faster per layer). False where nothing was advised."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + size) // HUGE_PAGE * HUGE_PAGE
    if not sys.platform.startswith("linux") or end <= start:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): tune_malloc_for_tensors keeps freed memory
    mapped, so after a one-off move of large tensors (weights_on_huge_pages) their old copies would stay resident."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


@functools.cache
def tune_malloc_for_tensors() -> bool:
    """Keep freed tensor memory in the heap instead of unmapping it (glibc only, process-wide, once: called when the
    first LLM runner is built on the CPU, so classic-only servers keep glibc's defaults).

    torch's CPU allocator uses malloc directly; by default glibc serves blocks over ~128 KiB-32 MiB with fresh
    mmaps, so every activation of a prefill-sized step page-faults anew (measured: rms_norm on 512x576 bf16
    1.2 ms -> 0.14 ms, a 512-token prefill ~1.5x faster). The cost is that peak activation memory stays reserved.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    log.debug("glibc malloc tuned for tensor workloads: %s", bool(ok))
    return bool(ok)
