"""Decode-step time and prefill throughput of ladle's ModelRunner vs transformers' own forward, same shapes.

A SmolLM-135M-shaped random Llama (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 32000) in
bfloat16; each figure is the best of --reps means over --steps steps (the box is shared: best-of filters noise).

    .venv/bin/python benchmarks/llm/step_time.py [--threads 2] [--batches 1,8,32] [--context 200] [--prefill 512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.runner import ModelRunner

SMOLLM_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        print(f"building a random SmolLM-135M-shaped Llama in {path} ...")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM_SHAPE)).to(torch.bfloat16).save_pretrained(path)
    return path


CLOCK = time.perf_counter  # --clock cpu: this thread's CPU time, steadier on a shared box (needs --threads 1)


def best_ms(step: Callable[[], object], steps: int, reps: int, between: Callable[[], None] = lambda: None) -> float:
    """Best over `reps` of the mean step time (ms); `between` runs untimed after each step (cache resets)."""
    step(), between()
    best = float("inf")
    for _ in range(reps):
        total = 0.0
        for _ in range(steps):
            start = CLOCK()
            step()
            total += CLOCK() - start
            between()
        best = min(best, total / steps)
    return best * 1e3


def ladle_decode(runner: ModelRunner, batch: int, context: int) -> Callable[[], object]:
    per_seq = -(-context // runner.block_size)
    seqs = [
        ScheduledSeq(str(i), [7], context - 1, list(range(i * per_seq, (i + 1) * per_seq)), True) for i in range(batch)
    ]
    sched = SchedulerOutput(seqs, batch)
    return lambda: runner.execute(sched)


def ladle_prefill(runner: ModelRunner, tokens: int) -> Callable[[], object]:
    seq = ScheduledSeq("p", [(i * 7) % 30000 for i in range(tokens)], 0, list(range(-(-tokens // 16))), True)
    sched = SchedulerOutput([seq], tokens)
    return lambda: runner.execute(sched)


def hf_decode(model: LlamaForCausalLM, batch: int, context: int, steps: int, reps: int) -> float:
    """One-token forward over a DynamicCache holding context-1 tokens, cropped back after each step (untimed)."""
    cache = DynamicCache(config=model.config)
    prompt = torch.randint(3, 30000, (batch, context - 1))
    with torch.inference_mode():
        model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.full((batch, 1), 7)
        position = torch.full((batch, 1), context - 1)
        return best_ms(
            lambda: model(token, cache=cache, position_ids=position, use_cache=True),
            steps, reps, lambda: cache.crop(-1),  # drop the token the step appended
        )


def hf_prefill(model: LlamaForCausalLM, tokens: int, reps: int) -> float:
    ids = torch.tensor([[(i * 7) % 30000 for i in range(tokens)]])
    with torch.inference_mode():
        return best_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), 2, reps)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/ladle-bench-smollm135m"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=200, help="tokens in each sequence's KV cache at the step")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-prepack", action="store_true", help="plain torch linears instead of oneDNN-prepacked")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: thread CPU time (--threads 1)")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread: use --threads 1")
    return args


def main() -> None:
    global CLOCK
    args = parse_args()
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    path = ensure_model(args.model_dir)
    runner = ModelRunner(path, torch.bfloat16, "cpu", 16, 2100, None, 256, 8192, prepack=not args.no_prepack)
    hf = None
    if not args.no_hf:
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    rows = []
    for batch in tqdm([int(b) for b in args.batches.split(",")], desc="decode"):
        ours = best_ms(ladle_decode(runner, batch, args.context), args.steps, args.reps)
        theirs = None if hf is None else hf_decode(hf, batch, args.context, args.steps, args.reps)
        rows.append((f"decode b={batch} ctx={args.context}", ours, theirs, batch))
    ours = best_ms(ladle_prefill(runner, args.prefill), 2, max(2, args.reps // 2))
    theirs = None if hf is None else hf_prefill(hf, args.prefill, max(2, args.reps // 2))
    rows.append((f"prefill {args.prefill} tokens", ours, theirs, args.prefill))
    print_table(rows, f"bf16, {args.threads} threads, {args.clock} clock, prepacked linears: {runner.prepacked}")


def print_table(rows: list[tuple[str, float, float | None, int]], title: str) -> None:
    print(f"\n{title}")
    print("| step | ladle ms | ladle tok/s | transformers ms | transformers tok/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours, theirs, tokens in rows:
        hf_cols = "- | - | -"
        if theirs is not None:
            hf_cols = f"{theirs:.2f} | {tokens / theirs * 1e3:,.0f} | {theirs / ours:.2f}x"
        print(f"| {name} | {ours:.2f} | {tokens / ours * 1e3:,.0f} | {hf_cols} |")


if __name__ == "__main__":
    main()
