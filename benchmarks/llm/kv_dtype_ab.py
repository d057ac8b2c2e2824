"""Decode-step time by KV-cache dtype (--kv-cache-dtype), in one process, alternating: the same model (the random
SmolLM-135M-shaped checkpoint of run.py, float32 or --dtype) in one compiled ModelRunner per cache dtype, every runner
stepping the same server-shaped batch in turn (sequences of --context tokens over 16-token blocks in a shuffled order,
as a busy pool hands them out). Alternating in one process is the comparison this noisy host allows (a server pair
drifts 10-30% between runs).

    .venv/bin/python benchmarks/llm/kv_dtype_ab.py [--dtype float32] [--kv float32,float16,bfloat16,fp8]
        [--batches 1,8,32] [--context 192] [--rounds 9] [--steps 8] [--threads 2]

Prints, per batch, each dtype's median step time (ms) over the rounds and its ratio to the first dtype's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import run as llm  # noqa: E402  (the benchmark checkpoint)
from quant import describe_machine, machine  # noqa: E402

from ladle.llm.dtypes import DTYPES, KV_DTYPES  # noqa: E402
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput  # noqa: E402
from ladle.llm.runner import ModelRunner  # noqa: E402


def make_runner(dtype: str, kv: str, num_blocks: int | None, memory: int | None, max_seqs: int) -> ModelRunner:
    runner = ModelRunner(llm.MODEL_DIR, DTYPES[dtype], "cpu", 16, num_blocks, memory, max_seqs, 2048, compile=True,
                         kv_cache_dtype=KV_DTYPES[kv])
    started = time.perf_counter()
    runner.compile_decoder(background=False)
    print(f"{kv} cache: decoder {runner.compile_state} in {time.perf_counter() - started:.1f} s", flush=True)
    return runner


def decode_batch(batch: int, context: int, num_blocks: int, seed: int) -> SchedulerOutput:
    per_seq = -(-context // 16)
    blocks = random.Random(seed).sample(range(num_blocks), batch * per_seq)
    seqs = [ScheduledSeq(str(i), [7], context - 1, blocks[i * per_seq : (i + 1) * per_seq], True)
            for i in range(batch)]
    return SchedulerOutput(seqs, batch)


def mean_ms(runner: ModelRunner, sched: SchedulerOutput, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.execute(sched)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's compute dtype")
    ap.add_argument("--kv", default="float32,float16,bfloat16", help="cache dtypes (--kv-cache-dtype's names, e.g. "
                    "fp8); ratios are to the first")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-mib", type=int, default=0, help="size each cache in MiB as a server does (a 16-bit "
                    "one then has twice the blocks) and draw the batch's blocks from all of it; 0: just enough blocks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm.ensure_checkpoint()
    kvs, batches = args.kv.split(","), [int(b) for b in args.batches.split(",")]
    needed = max(batches) * -(-args.context // 16) + 8
    memory = args.kv_cache_mib << 20 or None
    print(describe_machine(machine()), flush=True)
    print(f"a {args.dtype} model", flush=True)
    runners = {kv: make_runner(args.dtype, kv, None if memory else needed, memory, max(batches)) for kv in kvs}
    print(f"\n| batch | {' | '.join(f'{kv} ms' for kv in kvs)} | {' | '.join(f'{kv} / {kvs[0]}' for kv in kvs[1:])} |")
    print("|---:|" + "---:|" * (2 * len(kvs) - 1))
    with torch.inference_mode():
        for batch in batches:
            scheds = {kv: decode_batch(batch, args.context, runner.num_blocks, batch) for kv, runner in runners.items()}
            times: dict[str, list[float]] = {kv: [] for kv in kvs}
            for kv, runner in runners.items():
                mean_ms(runner, scheds[kv], 2)  # warm: first-call allocations
            for round_ in range(args.rounds):
                order = kvs if round_ % 2 == 0 else kvs[::-1]
                for kv in order:
                    times[kv].append(mean_ms(runners[kv], scheds[kv], args.steps))
            med = {kv: statistics.median(t) for kv, t in times.items()}
            ratios = [statistics.median(b / a for a, b in zip(times[kvs[0]], times[kv], strict=True)) for kv in kvs[1:]]
            print(f"| {batch} | {' | '.join(f'{med[kv]:.2f}' for kv in kvs)} | "
                  f"{' | '.join(f'{r:.3f}' for r in ratios)} |", flush=True)
    print(f"\n(median over {args.rounds} rounds of {args.steps} steps each, context {args.context}; ratios: median of "
          "the per-round ratios, below 1 = faster than the first dtype)")


if __name__ == "__main__":
    main()
