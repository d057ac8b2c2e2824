"""How fast batch-1 decode linears stream their weights on this machine, per oneDNN packing layout.

Thirty layers of SmolLM-135M-shaped bf16 weights (qkv, o, gate, up, down: 212 MB, far past any cache), each
multiplied by one token's activations through oneDNN's prepacked linear, as the LLM engine runs them. Prints
ms per pass and the effective weight-read rate, interleaving the layouts over several rounds (this VM is noisy).

    .venv/bin/python benchmarks/llm/gemv_bandwidth.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(960, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # out, in
LAYERS = 30


def seconds_per_pass(packs: list[list[torch.Tensor]], passes: int = 20) -> float:
    x, wide = torch.randn(1, 576).bfloat16(), torch.randn(1, 1536).bfloat16()

    def one_pass() -> None:
        for layer in packs:
            for (_, fan_in), packed in zip(SHAPES, layer, strict=True):
                torch.ops.mkldnn._linear_pointwise(wide if fan_in == 1536 else x, packed, None, "none", [], "")

    one_pass()
    start = time.perf_counter()
    for _ in range(passes):
        one_pass()
    return (time.perf_counter() - start) / passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = [[torch.randn(o, i).bfloat16() for o, i in SHAPES] for _ in range(LAYERS)]
    total = sum(w.numel() * w.element_size() for layer in weights for w in layer)
    print(f"{LAYERS} layers, {total / 1e6:.0f} MB of bf16 weights, {args.threads} torch threads", flush=True)
    for rnd in range(args.rounds):
        for hint in (1, 8, 32, 64):
            packs = [[torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in layer] for layer in weights]
            t = seconds_per_pass(packs)
            print(f"round {rnd + 1}/{args.rounds}  packing hint {hint:>2}: {t * 1e3:6.2f} ms/pass  "
                  f"{total / t / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
