"""Compiled CPU kernels: C sources beside this module, built at first use with the system C compiler for this host
(-march=native) and cached on disk, loaded with ctypes (no torch headers: a kernel compiles in about a second); and
C++ libraries of torch operators (`load_torch_ops`: built against the installed torch's headers, ~10-20 s once per
host and torch version), whose ops a step calls through torch's dispatcher without a Python frame.

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
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
# C++ operators include the C kernels; they write -inf into attention masks, so infinities stay defined
CXX_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC", "-std=c++20", "-w")
# Linked in a second step, without -ffast-math: linked with it, GCC adds crtfastmath.o, whose constructor turns on
# flush-to-zero / denormals-are-zero for the whole process when the library loads (every float op of the server,
# classic models included, would then lose subnormals)
LINK_FLAGS = ("-shared", "-fopenmp")
BUILD_TIMEOUT_S = 120


def cache_root() -> Path:
    """LADLE_CACHE, else $XDG_CACHE_HOME/ladle (~/.cache/ladle): compiled kernels and inductor's cache live here."""
    base = os.environ.get("LADLE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ladle"
    return Path(base)


def cache_dir() -> Path:
    """Where the kernels are cached: cache_root()/kernels."""
    return cache_root() / "kernels"


def cpu_flags() -> str:
    """The CPU's flags line (/proc/cpuinfo): what -march=native and inductor's generated code depend on."""
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
    target = _built(name, [compiler, *FLAGS, str(HERE / f"{name}.c")], [compiler, *LINK_FLAGS, "-lm"],
                    [HERE / f"{name}.c", *sorted(HERE.glob("*.h"))])  # the headers it may include
    if target is None:
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("kernel %s did not load (%s); the torch path is used (slower)", name, exc)
        return None


@functools.cache
def load_torch_ops(name: str) -> bool:
    """Build (if needed) and load `<name>.cpp`, a library of torch operators (TORCH_LIBRARY), compiled against the
    installed torch's headers: its ops then appear under torch.ops. False (logged) when it cannot be built."""
    import torch
    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        log.warning("no C++ compiler (c++/g++): torch operators %s not built; the torch path is used (slower)", name)
        return False
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    compile_command = [compiler, *CXX_FLAGS, abi, *(f"-I{path}" for path in cpp_extension.include_paths()),
                       str(HERE / f"{name}.cpp")]
    link_command = [compiler, *LINK_FLAGS, *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10",
                    "-ltorch_cpu"]
    # the C kernels (and their headers) it includes are part of its source
    sources = [HERE / f"{name}.cpp", *sorted(HERE.glob("*.c")), *sorted(HERE.glob("*.h"))]
    target = _built(name, compile_command, link_command, sources, extra=(torch.__version__.encode(),))
    if target is None:
        return False
    try:
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as exc:
        log.warning("torch operators %s did not load (%s); the torch path is used (slower)", name, exc)
        return False
    return True


def _built(name: str, compile_command: list[str], link_command: list[str], sources: list[Path],
           extra: tuple[bytes, ...] = ()) -> Path | None:
    """The cached library built by `compile_command` (to an object file: `-c -o <obj>` appended) and `link_command`
    (`<obj> -o <target>` inserted), building it when its key (the sources, the commands, the compiler's version, the
    CPU) is new."""
    commands = " ".join([*compile_command, "|", *link_command]).encode()
    key = hashlib.sha256(b"\0".join([*(path.read_bytes() for path in sources), commands,
                                     _version(compile_command[0]), cpu_flags().encode(), *extra])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        try:
            _build(compile_command, link_command, target)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("%s did not build (%s); the torch path is used (slower)", sources[0].name, exc)
            return None
    return target


def _version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _build(compile_command: list[str], link_command: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    obj = tmp + ".o"
    log.info("building %s (once per host and version) ...", target.name)
    try:
        for command in ([*compile_command, "-c", "-o", obj], [link_command[0], obj, *link_command[1:], "-o", tmp]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise subprocess.SubprocessError(done.stderr.strip()[-500:] or f"exit status {done.returncode}")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temporary file
        log.info("built %s", target)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
