"""Decode-shaped matmuls with quantized weights (src/ladle/llm/models/quant.py) against full width, cold cache.

Each workload is a set of weights far bigger than L3, cycled once per "step" the way one decode step walks the
model: SmolLM-135M (30 layers of qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, plus the 576->49152
head: 121 matmuls) and two copies of a 7B-ish layer's biggest shapes (4096->4096, 4096->11008; 4 matmuls).
Configurations run interleaved, round by round, so that a noisy neighbour slows all of them alike; the fastest round
is reported in ms per step (on shared cores a preempted thread stalls a whole GEMM: that is not the kernel), the
median in the progress lines. glibc malloc is tuned as the LLM runner tunes it. Every quantized configuration
runs ladle's own modules (quantize_weight), casts included: int8-dynamic takes bfloat16 activations (and converts
them to float32 for fbgemm) unless marked "f32 in". int4 g128 on 576-wide inputs uses groups of 64 there (128 does
not divide 576; see quant.py).

    .venv/bin/python benchmarks/micro/quant_linear.py [--m 1,8,32] [--rounds 5] [--configs "fp32 tiled,..."]

(x) is the speed-up over the first configuration run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ladle.llm.models.linear import PackedLinear, TiledLinear, can_prepack, tiled
from ladle.llm.models.quant import Method, QuantScheme, quantize_weight
from ladle.process import tune_malloc_for_tensors

SMOL = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
SEVEN_B = [(4096, 4096), (11008, 4096)] * 2
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
# name -> (activation dtype, build(weight) -> fn)
Build = Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _plain(dtype: torch.dtype) -> Build:
    def build(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        wd = w.to(dtype)
        return lambda x: F.linear(x, wd)
    return build


def _packed(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return PackedLinear(w.bfloat16())


def _tiled(dtype: torch.dtype) -> Build:
    def build(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return TiledLinear(w.to(dtype)) if tiled(w.to(dtype)) else _plain(dtype)(w)
    return build


def _quant(method: Method, group: int = 32) -> Build:
    return lambda w: quantize_weight(w, QuantScheme(method, group))


CONFIGS: dict[str, tuple[torch.dtype, Build]] = {
    "fp32": (torch.float32, _plain(torch.float32)),
    "bf16": (torch.bfloat16, _plain(torch.bfloat16)),
    "bf16 prepacked": (torch.bfloat16, _packed),
    "fp32 tiled": (torch.float32, _tiled(torch.float32)),
    "bf16 tiled": (torch.bfloat16, _tiled(torch.bfloat16)),
    "int8-dynamic (f32 in)": (torch.float32, _quant("int8-dynamic")),
    "int8-dynamic": (torch.bfloat16, _quant("int8-dynamic")),
    "int8-weight-only": (torch.bfloat16, _quant("int8-weight-only")),
    "int8-weight-only (f32 in)": (torch.float32, _quant("int8-weight-only")),
    "int4 g32": (torch.bfloat16, _quant("int4", 32)),
    "int4 g64": (torch.bfloat16, _quant("int4", 64)),
    "int4 g128": (torch.bfloat16, _quant("int4", 128)),
}
BYTES = {"fp32": 4.0, "bf16": 2.0, "bf16 prepacked": 2.0, "fp32 tiled": 4.0, "bf16 tiled": 2.0}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu flags: /proc/cpuinfo unreadable"
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS)
    prepack = "on" if can_prepack(torch.bfloat16, torch.device("cpu")) else "off"
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"cpu: {model}, {os.cpu_count()} cpus; torch {torch.__version__} ({capability}, "
        f"{torch.get_num_threads()} threads, bf16 prepack {prepack})\n{shown}"
    )


def weight_bytes(name: str, fns: list) -> float:
    if name in BYTES:
        return sum(f_w.numel() for f_w in fns) * BYTES[name]
    return float(sum(f.nbytes for f in fns))


def measure(workload: list[tuple[int, int]], m_values: list[int], rounds: int) -> dict[tuple[str, int], float]:
    masters = [torch.randn(n, k) * 0.02 for n, k in workload]
    built: dict[str, list] = {}
    for name, (_, build) in CONFIGS.items():
        started = time.perf_counter()
        built[name] = [build(w) for w in masters]
        size = weight_bytes(name, masters if name in BYTES else built[name])
        print(f"  built {name:<22} {size / 1e6:7.1f} MB in {time.perf_counter() - started:5.1f} s", flush=True)
    results: dict[tuple[str, int], float] = {}
    for m in m_values:
        inputs = {k: torch.randn(m, k) for k in {k for _, k in workload}}
        samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
        with torch.inference_mode():
            for r in range(rounds + 1):  # round 0 warms up (first-call setup, page faults)
                for name, fns in built.items():
                    dtype = CONFIGS[name][0]
                    xs = {k: x.to(dtype) for k, x in inputs.items()}
                    started = time.perf_counter()
                    for (_, k), fn in zip(workload, fns, strict=True):
                        fn(xs[k])
                    if r:
                        samples[name].append((time.perf_counter() - started) * 1e3)
        for name in CONFIGS:
            results[name, m] = min(samples[name])
            median = statistics.median(samples[name])
            print(f"  M={m:<3} {name:<22} {results[name, m]:8.2f} ms/step (median {median:.2f})", flush=True)
    sizes = {name: weight_bytes(name, masters if name in BYTES else built[name]) for name in CONFIGS}
    results.update({(name, 0): sizes[name] / 1e6 for name in CONFIGS})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,8,32", help="rows per matmul (tokens in the step)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    m_values = [int(v) for v in args.m.split(",")]
    if args.configs:
        keep = [c.strip() for c in args.configs.split(",")]
        for name in list(CONFIGS):
            if name not in keep:
                del CONFIGS[name]
    tune_malloc_for_tensors()
    print(cpu_flags(), flush=True)
    started = time.perf_counter()
    tables = {}
    for title, workload in (("SmolLM-135M step (121 matmuls)", SMOL), ("7B-ish 4096->4096, 4096->11008 x2", SEVEN_B)):
        print(f"{title}:", flush=True)
        tables[title] = measure(workload, m_values, args.rounds)
    print()
    for title, res in tables.items():
        base = next(iter(CONFIGS))
        print(f"### {title}: ms per step (best of {args.rounds} rounds); (x) = speed-up over {base}")
        print("| config | weight MB | " + " | ".join(f"M={m}" for m in m_values) + " |")
        print("|---|---|" + "---|" * len(m_values))
        for name in CONFIGS:
            cells = [f"{res[name, m]:.2f} ({res[base, m] / res[name, m]:.2f}x)" for m in m_values]
            print(f"| {name} | {res[name, 0]:.0f} | " + " | ".join(cells) + " |")
        print()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
