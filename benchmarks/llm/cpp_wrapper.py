"""The compiled decoder's step with inductor's C++ wrapper (the CPU default, compiled.cpp_wrapper) against its generated
Python wrapper, in one process: two runners of the random SmolLM-135M-shaped checkpoint of run.py, one per wrapper,
their forwards (the decoder alone: no logits, no sampling) timed in alternating rounds at batch 1 and 8 (one new
token per sequence after 191 of context). Figures are the best round's mean ms per forward (a shared 2-core box
stalls whole rounds). Graphs come from $LADLE_CACHE/compiled when there (else compiled first: minutes).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/cpp_wrapper.py [--batches 1,8] [--rounds 6] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import run as llm  # noqa: E402  (benchmarks/llm/run.py: the checkpoint)
from quant import describe_machine, machine  # noqa: E402

from ladle.llm.outputs import ScheduledSeq, SchedulerOutput  # noqa: E402
from ladle.llm.runner import ModelRunner  # noqa: E402

CONTEXT = 191


def runner(cpp: bool) -> ModelRunner:
    os.environ["LADLE_CPP_WRAPPER"] = str(int(cpp))  # read when the runner describes its graphs
    built = ModelRunner(llm.ensure_checkpoint(), dtype=torch.float32, num_blocks=512, compile=True)
    started = time.perf_counter()
    built.compile_decoder(background=False)
    if built.compile_state != "compiled":
        sys.exit("the decoder did not compile: see the log")
    print(f"{'C++' if cpp else 'Python'} wrapper: graphs ready in {time.perf_counter() - started:.1f} s", flush=True)
    return built


def decode_step(batch: int) -> SchedulerOutput:
    blocks = -(-(CONTEXT + 1) // 16)
    seqs = [ScheduledSeq(f"s{i}", [7], CONTEXT, list(range(i * blocks, (i + 1) * blocks)), True) for i in range(batch)]
    return SchedulerOutput(seqs, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(describe_machine(machine()), flush=True)
    runners = {"python": runner(False), "cpp": runner(True)}
    print("\n| batch | Python wrapper (ms) | C++ wrapper (ms) | saved (ms) |\n|---|---|---|---|")
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            best = {name: float("inf") for name in runners}
            for _ in range(args.rounds):
                for name, r in runners.items():
                    step = r.prepare_inputs(decode_step(batch))
                    for _ in range(3):
                        r._forward(step)
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        r._forward(step)
                    best[name] = min(best[name], (time.perf_counter() - started) / args.steps * 1e3)
            print(f"| {batch} | {best['python']:.2f} | {best['cpp']:.2f} | {best['python'] - best['cpp']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
