"""Start-up of a compiled LLM (issue 16: "cold start with a warm cache under 10 s; state the first-start cost"): a real
`ladle serve` of the random SmolLM-135M-shaped checkpoint of run.py, started twice on one fresh $LADLE_CACHE — the
first start compiles the decoder's graphs and keeps them (precompiled.py), the second loads them — for each wrapper
(inductor's C++ wrapper, the CPU default, and generated Python: LADLE_CPP_WRAPPER=0). Seconds from spawning the
process to READY (/v2/health/ready) and to serving from the compiled graphs (ladle_llm_decoder_compiled = 1).
The host's compiled kernels are copied into the fresh cache (their one-time build is `make install`'s, not this).
Writes out/warm_start.json and prints a markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/warm_start.py [--wrappers cpp,python] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import run as llm  # noqa: E402  (benchmarks/llm/run.py: the checkpoint)
from quant import describe_machine, machine  # noqa: E402
from spawn import ROOT, spawned_server, wait_compiled  # noqa: E402

from ladle.llm.kernels.build import cache_dir  # noqa: E402

OUT = HERE / "out"
NAME = "smollm"


def start(dtype: str, log: Path) -> dict[str, float | None]:
    """One start: seconds from spawn to READY and to the compiled graphs serving."""
    command = [str(ROOT / ".venv/bin/ladle"), "serve", "--model", str(llm.ensure_checkpoint()), "--dtype", dtype,
               "--served-model-name", NAME, "--no-enforce-eager"]
    spawned_at = time.perf_counter()
    with spawned_server(command, log, timeout_s=300) as server:
        port = int(server.url.rsplit(":", 1)[1])
        compiled = wait_compiled(port, NAME, timeout_s=900)
        total = None if compiled is None else time.perf_counter() - spawned_at
        return {"ready_s": round(server.ready_s, 2), "compiled_s": None if total is None else round(total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrappers", default="cpp,python")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    host = machine()
    print(describe_machine(host), flush=True)
    rows, kernels = [], cache_dir()  # before LADLE_CACHE points elsewhere
    for wrapper in args.wrappers.split(","):
        cache = OUT / f"warm-start-cache-{wrapper}"
        shutil.rmtree(cache, ignore_errors=True)
        if kernels.exists():
            shutil.copytree(kernels, cache / "kernels")
        os.environ.update(LADLE_CACHE=str(cache), LADLE_CPP_WRAPPER="1" if wrapper == "cpp" else "0")
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # inductor's cache goes under the fresh LADLE_CACHE too
        for which in ("first start (empty cache)", "second start (graphs on disk)"):
            print(f"{wrapper} wrapper, {which} ...", flush=True)
            row = {"wrapper": wrapper, "start": which, **start(args.dtype, OUT / f"warm-start-{wrapper}.log")}
            print(f"  ready {row['ready_s']} s, compiled graphs serving {row['compiled_s']} s after spawn", flush=True)
            rows.append(row)
        shutil.rmtree(cache, ignore_errors=True)
    (OUT / "warm_start.json").write_bytes(orjson.dumps({"machine": host, "dtype": args.dtype, "rows": rows},
                                                       option=orjson.OPT_INDENT_2))
    print("\n| wrapper | start | READY (s) | compiled graphs serving (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['wrapper']} | {row['start']} | {row['ready_s']} | {row['compiled_s']} |")


if __name__ == "__main__":
    main()
