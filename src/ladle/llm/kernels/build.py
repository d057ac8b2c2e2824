"""Compiled CPU kernels: C sources beside this module, built at first use with the system C compiler for this host
(-march=native) and cached on disk, loaded with ctypes. No torch headers: a kernel compiles in about a second.

Invariant: a kernel is rebuilt whenever its source, the flags, the compiler or the CPU's flags change (they are all in
the cache key), and is written atomically (a half-written library is never loaded). Without a compiler, or when the
build fails, `load` returns None and callers keep their torch path; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120


def cache_root() -> Path:
    """LADLE_CACHE, else $XDG_CACHE_HOME/ladle (~/.cache/ladle): compiled kernels and inductor's cache live here."""
    base = os.environ.get("LADLE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ladle"
    return Path(base)


def cache_dir() -> Path:
    """Where the kernels are cached: cache_root()/kernels."""
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled `<name>.c` of this folder, built if needed; None (logged) when it cannot be built."""
    import torch  # noqa: F401  (first: the kernel then shares torch's OpenMP runtime, libgomp.so.1, not a second one)

    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (cc/gcc): kernel %s not built; the torch path is used (slower)", name)
        return None
    source = (HERE / f"{name}.c").read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _version(compiler), _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        try:
            _build(compiler, HERE / f"{name}.c", target)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("kernel %s did not build (%s); the torch path is used (slower)", name, exc)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("kernel %s did not load (%s); the torch path is used (slower)", name, exc)
        return None


def _version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-500:] or f"exit status {done.returncode}")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temporary file
        log.info("built kernel %s (%s)", source.name, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
