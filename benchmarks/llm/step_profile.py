"""Where an engine step's time goes (issue 16): decode steps at batch 1, 8 and 32 and a mixed prefill+decode step of
ladle's real EngineCore (scheduler, runner, sampler, update), timed by phase with wall clocks and split by op family
with torch.profiler. The random SmolLM-135M-shaped Llama of benchmarks/llm (128-token prompts, mid-generation
context), float32 and, where the CPU has native bf16, bfloat16.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/step_profile.py [--dtype float32,bfloat16] [--batches 1,8,32]
        [--steps 20] [--attention operator|kernel|gather] [--gemm tiled|onednn] [--compile] [--quantization int8]

Writes out/step_profile-<dtype>.json and prints a markdown table (ms per step by family, and the share of each).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from quant import describe_machine, machine  # noqa: E402 (benchmarks/llm/quant.py: CPU model and flags)

from ladle.config import LLMConfig  # noqa: E402
from ladle.llm.engine import EngineCore  # noqa: E402
from ladle.llm.factory import build_core  # noqa: E402
from ladle.llm.kernels.paged import PagedDecode  # noqa: E402
from ladle.llm.request import Request  # noqa: E402
from ladle.llm.sampling_params import SamplingParams  # noqa: E402

OUT = HERE / "out"
MODEL = OUT / "smollm-135m-random"
PROMPT, DECODED = 128, 64  # profile mid-generation: 192 tokens of context

#: op name (profiler key) -> family; anything else inside the forward is "other ops"
FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    ("GEMM", ("linear", "addmm", "aten::mm", "matmul", "mkldnn", "_weight_int", "quantized", "onednn", "fbgemm",
              "aten::bmm (lm)")),
    ("attention", ("scaled_dot_product", "_flash_attention", "bmm", "baddbmm", "softmax", "index_select",
                   "index_copy", "ladle::paged", "ladle::attention")),
    ("norm/rope/act", ("rsqrt", "pow", "mean", "silu", "aten::mul", "aten::add", "aten::neg", "aten::cat",
                       "aten::sub", "aten::div", "rms_norm", "embedding", "aten::copy_", "aten::slice",
                       "aten::view", "aten::transpose", "aten::reshape", "aten::narrow", "aten::empty",
                       "aten::index_select (emb)", "CompiledFxGraph")),  # inductor's fused kernels run inside it
]
COMPILED = False  # --compile: the torch.compile'd decoder (compiled.py) instead of eager
QUANTIZATION = "none"  # --quantization: the weight format profiled
BLOCK_SIZE = 16  # --block-size: tokens per KV-cache block
PHASES = ("schedule", "prepare", "forward", "logits", "sample", "update")


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other ops"


def build(dtype: str, threads: int) -> EngineCore:
    config = LLMConfig(model=str(MODEL), dtype=dtype, num_kv_blocks=2048, max_num_seqs=64,
                       max_num_batched_tokens=4096, num_threads=threads, enable_prefix_caching=False,
                       enforce_eager=not COMPILED, quantization=QUANTIZATION, block_size=BLOCK_SIZE)
    core = build_core(config, MODEL)
    if core.runner.compile_thread is not None:  # profile the compiled graphs, not the eager steps meanwhile
        core.runner.compile_thread.join()
        if core.runner.compile_state != "compiled":
            sys.exit(f"torch.compile failed ({core.runner.compile_state}): see the log")
    return core


def add(core: EngineCore, tag: str, count: int, rng: random.Random, max_tokens: int = 10_000) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=None)
    for i in range(count):
        prompt = [rng.randrange(3, 32000) for _ in range(PROMPT)]
        core.add_request(Request(f"{tag}-{i}", prompt, params))


def instrument(core: EngineCore) -> dict[str, float]:
    """Wrap the step's pieces in record_function scopes and wall clocks (the step itself is the engine's own); the
    returned dict accumulates each phase's seconds."""
    clocks: dict[str, float] = defaultdict(float)
    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            with record_function(f"phase::{name}"):
                result = fn(*args, **kwargs)
            clocks[name] += time.perf_counter() - start
            return result
        return wrapper

    runner, scheduler = core.runner, core.scheduler
    scheduler.schedule = timed("schedule", scheduler.schedule)
    scheduler.update = timed("update", scheduler.update)
    runner.prepare_inputs = timed("prepare", runner.prepare_inputs)
    model = runner.model
    model.forward = timed("forward", model.forward)
    model.compute_logits = timed("logits", model.compute_logits)
    core._sample = timed("sample", core._sample)
    return clocks


def plain_ms(core: EngineCore, steps: int, before: Callable[[int], None] = lambda i: None) -> float:
    """Mean wall time of a step with nothing attached (the profiler's own cost per op inflates its figures)."""
    total = 0.0
    for i in range(steps):
        before(i)
        start = time.perf_counter()
        core.step()
        total += time.perf_counter() - start
    return total * 1e3 / steps


def _attribute_the_kernel() -> None:
    """The compiled attention kernel is a ctypes call the profiler cannot see: name it, so that its time counts as
    attention rather than as Python (here only: production calls pay nothing for it)."""
    call = PagedDecode.__call__

    def named(self, *args, **kwargs):
        with record_function("ladle::paged_decode"):
            return call(self, *args, **kwargs)

    PagedDecode.__call__ = named


def profile_steps(core: EngineCore, steps: int, clocks: dict[str, float]) -> dict:
    clocks.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            core.step()
        wall = time.perf_counter() - start
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("phase::"):
            continue
        ops[event.key] += event.self_cpu_time_total / 1e3  # ms over all steps
    by_family: dict[str, float] = defaultdict(float)
    for name, ms in ops.items():
        by_family[family(name)] += ms
    in_ops = sum(by_family.values())
    phases = {name: clocks[name] * 1e3 / steps for name in PHASES}
    result = {f: ms / steps for f, ms in by_family.items()}
    result["python (outside ops)"] = max(0.0, wall * 1e3 / steps - in_ops / steps)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"step_ms": wall * 1e3 / steps, "families": result, "phases": phases,
            "top_ops": [(k, v / steps) for k, v in top]}


def decode_case(dtype: str, threads: int, batch: int, steps: int) -> dict:
    core = build(dtype, threads)
    add(core, "d", batch, random.Random(batch))
    while any(r.num_output_tokens < DECODED for r in core.requests.values()):
        core.step()  # prefill, then decode to mid-generation
    plain = plain_ms(core, steps)
    return {**profile_steps(core, steps, instrument(core)), "plain_step_ms": plain}


def mixed_case(dtype: str, threads: int, batch: int, steps: int) -> dict:
    """`batch - 1` sequences decoding while one new 128-token prompt is prefilled in the same step."""
    core = build(dtype, threads)
    rng = random.Random(7)
    add(core, "d", batch - 1, rng)
    while any(r.num_output_tokens < DECODED for r in core.requests.values()):
        core.step()
    # each step prefills one new prompt (sampled once, finished) beside the decodes: every step is mixed
    plain = plain_ms(core, steps, lambda i: add(core, f"w{i}", 1, rng, max_tokens=1))
    clocks = instrument(core)
    results = []
    for i in range(steps):
        add(core, f"p{i}", 1, rng, max_tokens=1)
        results.append(profile_steps(core, 1, clocks))
    return {**_mean(results), "plain_step_ms": plain}


def _mean(results: list[dict]) -> dict:
    out: dict = {"step_ms": sum(r["step_ms"] for r in results) / len(results), "families": {}, "phases": {}}
    for key in ("families", "phases"):
        names = {n for r in results for n in r[key]}
        out[key] = {n: sum(r[key].get(n, 0.0) for r in results) / len(results) for n in names}
    out["top_ops"] = results[-1]["top_ops"]
    return out


def table(dtype: str, cases: dict[str, dict]) -> str:
    families = ["GEMM", "attention", "norm/rope/act", "other ops", "python (outside ops)"]
    lines = [f"**{dtype}** — ms per step (share of the step)", "",
             "| case | step (no profiler) | step (profiled) | " + " | ".join(families) + " | " + " | ".join(PHASES)
             + " |", "|---|---|---|" + "---|" * (len(families) + len(PHASES))]
    for name, r in cases.items():
        fam = " | ".join(f"{r['families'].get(f, 0.0):.2f} ({100 * r['families'].get(f, 0.0) / r['step_ms']:.0f}%)"
                         for f in families)
        ph = " | ".join(f"{r['phases'].get(p, 0.0):.2f}" for p in PHASES)
        lines.append(f"| {name} | {r['plain_step_ms']:.2f} | {r['step_ms']:.2f} | {fam} | {ph} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--attention", default=None, help="LADLE_ATTENTION for this run (operator, kernel, gather)")
    parser.add_argument("--gemm", default=None, help="LADLE_GEMM for this run (tiled, onednn)")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd decoder (waits for it)")
    parser.add_argument("--quantization", default="none", help="--quantization for the model (int8, int4, ...)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (--block-size)")
    args = parser.parse_args()
    global QUANTIZATION, BLOCK_SIZE
    QUANTIZATION, BLOCK_SIZE = args.quantization, args.block_size
    if args.gemm:
        os.environ["LADLE_GEMM"] = args.gemm
    global COMPILED
    COMPILED = args.compile
    if args.attention:
        os.environ["LADLE_ATTENTION"] = args.attention
    _attribute_the_kernel()
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run benchmarks/llm/run.py once (it builds the random checkpoint)")
    host = machine()
    print(describe_machine(host))
    for dtype in args.dtype.split(","):
        cases: dict[str, dict] = {}
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"[{dtype}] decode batch {batch} ...", flush=True)
            cases[f"decode b={batch}"] = decode_case(dtype, args.threads, batch, args.steps)
        print(f"[{dtype}] mixed: 1 prefill of {PROMPT} + 15 decodes ...", flush=True)
        cases["prefill 128 + 15 decodes"] = mixed_case(dtype, args.threads, 16, max(4, args.steps // 4))
        OUT.mkdir(exist_ok=True)
        payload = {"dtype": dtype, "threads": args.threads, "machine": host, "cases": cases,
                   "attention": os.environ.get("LADLE_ATTENTION", "operator"), "compiled": COMPILED,
                   "gemm": os.environ.get("LADLE_GEMM", "tiled"), "quantization": QUANTIZATION,
                   "block_size": BLOCK_SIZE}
        suffix = (f"-{args.attention}" if args.attention else "") + (f"-{args.gemm}" if args.gemm else "")
        suffix += "-compiled" if COMPILED else ""
        suffix += f"-{QUANTIZATION}" if QUANTIZATION != "none" else ""
        suffix += f"-block{BLOCK_SIZE}" if BLOCK_SIZE != 16 else ""
        (OUT / f"step_profile-{dtype}{suffix}.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        print(table(dtype, cases))
        for name, r in cases.items():
            print(f"  {name} top ops: " + ", ".join(f"{k} {v:.2f}" for k, v in r["top_ops"][:8]))


if __name__ == "__main__":
    main()
