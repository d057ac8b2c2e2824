"""`make bench`: the standard benchmark set, end to end (about 80 minutes on the 2-core dev box).

Runs the hardware probe, the classic (KServe v2) benchmark and the LLM (OpenAI API) benchmark one after the
other, never overlapping (each would skew the others), and says where each wrote its tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = [
    ("hardware roofline figures", [str(HERE / "hardware.py")]),
    ("classic: iris + minilm, ladle vs a bare Starlette floor", [str(HERE / "classic" / "run.py")]),
    ("KServe v2 over gRPC vs REST: iris and minilm", [str(HERE / "classic" / "grpc_vs_rest.py")]),
    ("rollouts: what splits, sticky keys and shadow copies cost iris", [str(HERE / "classic" / "rollout_paths.py"),
                                                                        "--rounds", "5"]),
    ("LLM: SmolLM-135M-shaped Llama, ladle vs transformers", [str(HERE / "llm" / "run.py")]),
    ("LLM step profile: where a decode step's time goes", [str(HERE / "llm" / "step_profile.py"),
                                                           "--dtype", "float32,bfloat16"]),
    ("LLM weight formats: full width vs int8 / int4, and the demo GGUF", [str(HERE / "llm" / "quant.py")]),
    ("LLM speculative decoding: off vs n-gram on the demo GGUF", [str(HERE / "llm" / "speculative.py")]),
    ("overload: 10x capacity for 60 s, classic and LLM", [str(HERE / "overload" / "run.py")]),
    ("batch path: a Batches API job alone vs real time; TTFT under a batch", [str(HERE / "jobs" / "batch_path.py")]),
    ("Ray: 1 vs 2 replicas, routing overhead, prefix-aware routing", [str(HERE / "cluster" / "ray_scaling.py")]),
]


def main() -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    for index, (title, args) in enumerate(STEPS, start=1):
        print(f"\n=== [{index}/{len(STEPS)}] {title} ===", flush=True)
        step_started = time.monotonic()
        result = subprocess.run([sys.executable, *args], env=env, cwd=HERE.parent)
        print(f"=== [{index}/{len(STEPS)}] done in {time.monotonic() - step_started:.0f}s ===", flush=True)
        if result.returncode != 0:
            print(f"benchmark step failed ({title}), exit {result.returncode}", file=sys.stderr)
            return result.returncode
    print(f"\nall benchmarks done in {(time.monotonic() - started) / 60:.1f} min; tables in "
          f"benchmarks/{{classic,llm,overload,jobs,cluster}}/out/, plot in benchmarks/llm/throughput.png; "
          "benchmarks/RESULTS.md records them with the machine and commands")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
