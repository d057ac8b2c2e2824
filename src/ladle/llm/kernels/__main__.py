"""`python -m ladle.llm.kernels`: build this host's C kernels and torch operators now (`make install` runs it), so that
the first LLM to load does not wait for the compiler (~15 s for the operators). Cached: a second run returns at once.
A kernel that cannot be built is reported, not fatal: ladle then keeps its torch paths."""

from __future__ import annotations

import sys
import time

from ladle.llm.kernels.build import cache_dir, load, load_torch_ops


def main() -> int:
    print(f"ladle kernels: building for this host into {cache_dir()} (once per host and torch version) ...",
          flush=True)
    for name, build in (("paged_decode.c", lambda: load("paged_decode") is not None),
                        ("ops.cpp", lambda: load_torch_ops("ops"))):
        started = time.perf_counter()
        built = build()
        state = "ready" if built else "NOT built (see the warning above; the torch path serves)"
        print(f"  {name}: {state} ({time.perf_counter() - started:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
