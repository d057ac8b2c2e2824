"""The LLM benchmark: output tokens/s of `ladle serve` (HTTP, driven by `ladle bench serve`) at 1, 8 and 32 concurrent
requests vs transformers `generate` sequential and static-batched on the very same prompts, in one run, plus the
machine's roofline. Random SmolLM-135M-shaped Llama, bf16, 128 in / 128 out (ignore_eos); writes out/ and the PNG.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/run.py [--threads 1,2] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/hardware.py, spawn.py
import hardware  # noqa: E402
from spawn import spawned_server  # noqa: E402

from ladle.bench.datasets import BenchTokenizer  # noqa: E402
from ladle.bench.serve import ServeBenchConfig, run  # noqa: E402
from ladle.bench.serve_runner import load_samples  # noqa: E402

OUT = HERE / "out"
MODEL_DIR = OUT / "smollm-135m-random"
SMOLLM_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2,
)
INPUT_LEN = OUTPUT_LEN = 128
SERVED_NAME = "smollm"
PORT = 18321
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- checkpoint ---------------------------------------------------------------------------------------
def _corpus(words: int, seed: int = 0) -> Iterator[str]:
    """Pseudo-words from random syllables: enough distinct pairs for a BPE to learn ~32k merges."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"] + ["th", "sh", "ng", "qu", "st"]
    for _ in range(words // 20):
        sentence = [''.join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 3, 4)))) for _ in range(20)]
        yield " ".join(sentence).capitalize() + rng.choice((".", ",", "!", "?", f" {rng.randint(0, 9999)}."))


def build_tokenizer(path: Path) -> None:
    """A byte-level BPE (SmolLM's kind) of at most 32000 ids trained on generated text; <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(2_000_000), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def ensure_checkpoint(path: Path = MODEL_DIR) -> Path:
    """Build the random SmolLM-shaped checkpoint and its tokenizer once; later runs reuse them."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    print(f"building a random SmolLM-135M-shaped Llama and a 32k BPE tokenizer in {path} ...", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)
    build_tokenizer(path)
    return path


# -- ladle ----------------------------------------------------------------------------------------------
@contextmanager
def ladle_server(model_dir: Path, threads: int, max_num_seqs: int, port: int = PORT) -> Iterator[subprocess.Popen]:
    """`ladle serve` in bfloat16 with a KV cache for max_num_seqs x 512 tokens; yields the process (for py-spy)."""
    log = OUT / f"server-{threads}t.log"
    log.write_bytes(b"")
    cmd = [sys.executable, "-m", "ladle", "serve", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
           "--dtype", "bfloat16", "--num-threads", str(threads), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", "2048", "--max-model-len", "512", "--kv-cache-memory", "512MiB",
           "--log-level", "warning"]
    with spawned_server(cmd, log, port=port, timeout_s=300, poll_s=0.2) as spawned:
        yield spawned.process


def bench_config(port: int, concurrency: int, model_dir: Path, warmups: int) -> ServeBenchConfig:
    return ServeBenchConfig(
        base_url=f"http://127.0.0.1:{port}", model=SERVED_NAME, tokenizer=model_dir, dataset_name="random",
        random_input_len=INPUT_LEN, random_output_len=OUTPUT_LEN, num_prompts=max(4, 2 * concurrency),
        max_concurrency=concurrency, num_warmups=warmups, ignore_eos=True, seed=concurrency,
        metric_percentiles="50,90,99",
    )


def _box_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS  # all but idle and iowait


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime, every thread


@contextmanager
def foreign_cpu(pids: list[int]) -> Iterator[dict[str, float]]:
    """CPU seconds other processes took on this shared box during the block, in `["foreign_cpu_s"]`: a phase
    measured while someone else was busy shows it (2 cores in all, so 1 s/s is half the machine)."""
    box, own, started = _box_busy_s(), sum(map(_cpu_s, pids)), time.perf_counter()
    out: dict[str, float] = {}
    yield out
    out["foreign_cpu_s"] = max(0.0, (_box_busy_s() - box) - (sum(map(_cpu_s, pids)) - own))
    out["phase_s"] = time.perf_counter() - started


def run_ladle(model_dir: Path, threads: int, concurrency: int, server_pid: int) -> dict[str, Any]:
    print(f"ladle, {threads} thread(s), concurrency {concurrency} ...", flush=True)
    with foreign_cpu([os.getpid(), server_pid]) as other:
        result = run(bench_config(PORT, concurrency, model_dir, warmups=min(concurrency, 8)))
    s = result.summary
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed: {next(r.error for r in result.records if r.error)}")
    (OUT / f"ladle-{threads}t-c{concurrency}.json").write_bytes(result.to_json())
    return {"threads": threads, "concurrency": concurrency, "requests": s["completed"], "seconds": s["duration"],
            "output_tok_s": s["output_throughput"], **other, **{k: v for k, v in s.items() if k.endswith("_ms")}}


# -- transformers ---------------------------------------------------------------------------------------
class Transformers:
    """transformers' own LlamaForCausalLM + generate on the same checkpoint, greedy, exactly OUTPUT_LEN new tokens."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        from transformers import AutoTokenizer, LlamaForCausalLM

        torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.bench_tok = BenchTokenizer(model_dir)

    def _generate(self, texts: list[str], new_tokens: int, latencies: dict[str, list[float]] | None = None) -> int:
        from transformers import LogitsProcessorList

        enc = self.tok(texts, return_tensors="pt", padding=True)
        clock = _StepClock()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, logits_processor=LogitsProcessorList([clock]))
        if latencies is not None:  # every request of a static batch sees the same token times
            latencies["ttft"] += [clock.ttft_ms] * len(texts)
            latencies["itl"] += clock.itl_ms * len(texts)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(texts)

    def run(self, concurrency: int) -> dict[str, Any]:
        """The very prompts `ladle bench serve` sent at this concurrency (same seed), one at a time for 1, else in
        static left-padded batches of `concurrency`; a short generate at that batch size first warms the kernels."""
        config = bench_config(PORT, concurrency, self.model_dir, warmups=min(concurrency, 8))  # as the servers get
        prompts = [p.prompt for p in load_samples(config, self.bench_tok)[:config.num_prompts]]
        assert all(len(ids) == INPUT_LEN for ids in self.tok(prompts)["input_ids"]), "prompts must be 128 tokens"
        label = "sequential" if concurrency == 1 else f"static batch {concurrency}"
        self._generate(prompts[:concurrency], 4)
        chunks = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
        started, tokens = time.perf_counter(), 0
        latencies: dict[str, list[float]] = {"ttft": [], "itl": []}
        with foreign_cpu([os.getpid()]) as other:
            for chunk in tqdm(chunks, desc=f"transformers {label}", unit="batch", file=sys.stderr):
                tokens += self._generate(chunk, OUTPUT_LEN, latencies)
        seconds = time.perf_counter() - started
        pct = {f"p{q}_{k}_ms": float(np.percentile(v, q)) for k, v in latencies.items() for q in (50, 90, 99)}
        return {"mode": label, "concurrency": concurrency, "requests": len(prompts), "seconds": seconds,
                "output_tok_s": tokens / seconds, **pct, **other}


class _StepClock:
    """A logits processor that only notes when each decoding step's logits arrive: transformers' own TTFT
    (prompt to first token, prefill included) and inter-token latencies, without a streamer."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores

    @property
    def ttft_ms(self) -> float:
        return (self.stamps[0] - self.started) * 1e3

    @property
    def itl_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def measure(model_dir: Path, thread_counts: list[int], headline: int, concurrencies: list[int],
            max_num_seqs: int, hf_threads: int) -> tuple[list[dict], list[dict]]:
    """Each transformers mode runs right after ladle's run at the same concurrency (headline server, idle while
    transformers runs), so a pair shares the box's conditions; other thread counts follow."""
    hf = Transformers(model_dir, hf_threads)
    ladle_rows, hf_rows = [], []
    for threads in sorted(thread_counts, key=lambda t: t != headline):
        with ladle_server(model_dir, threads, max_num_seqs) as server:
            for c in concurrencies:
                ladle_rows.append(run_ladle(model_dir, threads, c, server.pid))
                if threads == headline:
                    hf_rows.append(hf.run(c))
    return sorted(ladle_rows, key=lambda r: (r["threads"], r["concurrency"])), hf_rows


# -- report ---------------------------------------------------------------------------------------------
def roofline(hw: dict[str, float], model_dir: Path) -> dict[str, float]:
    """Batch-1 decode floor: every weight read once per step; batch-32: 2 FLOPs per parameter per token."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (not a dict)
    weight_bytes = params * 2
    b1_ms = weight_bytes / (hw["bandwidth_gbs"] * 1e9) * 1e3
    b32_ms = 2 * params * 32 / (hw["bf16_gflops"] * 1e9) * 1e3
    return {"params": params, "weight_bytes": weight_bytes, "batch1_step_ms": b1_ms, "batch1_tok_s": 1e3 / b1_ms,
            "batch32_step_ms": b32_ms, "batch32_tok_s": 32e3 / b32_ms}


def markdown(ladle: list[dict], hf: list[dict], headline: int) -> str:
    seq = next(r["output_tok_s"] for r in hf if r["mode"] == "sequential")
    static = {r["concurrency"]: r["output_tok_s"] for r in hf}
    lines = ["| concurrency | ladle threads | ladle out tok/s | vs HF sequential | vs HF static batch | "
             "TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms | other load |",
             "|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in ladle:
        c = r["concurrency"]
        vs_static = f"{r['output_tok_s'] / static[c]:.2f}x" if c in static and c > 1 else "-"
        mark = "**" if r["threads"] == headline else ""
        lines.append(f"| {c} | {mark}{r['threads']}{mark} | {mark}{r['output_tok_s']:,.1f}{mark} | "
                     f"{r['output_tok_s'] / seq:.2f}x | {vs_static} | {r['p50_ttft_ms']:,.0f} / "
                     f"{r['p99_ttft_ms']:,.0f} | {r['p50_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | "
                     f"{r['p50_tpot_ms']:.1f} | {_load(r)} |")
    lines += ["", "| transformers | requests | seconds | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
              "| other load |", "|---|---:|---:|---:|---|---|---:|"]
    lines += [f"| {r['mode']} | {r['requests']} | {r['seconds']:.1f} | {r['output_tok_s']:,.1f} | "
              f"{r['p50_ttft_ms']:,.0f} / {r['p99_ttft_ms']:,.0f} | {r['p50_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | "
              f"{_load(r)} |" for r in hf]
    lines.append("\nother load: CPU s/s that other processes used during the phase (2 cores in all; 0 = quiet).")
    return "\n".join(lines)


def _load(row: dict[str, Any]) -> str:
    return f"{row['foreign_cpu_s'] / row['phase_s']:.2f}"


def plot(ladle: list[dict], hf: list[dict], path: Path, headline: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for threads in sorted({r["threads"] for r in ladle}):
        rows = [r for r in ladle if r["threads"] == threads]
        left.plot([r["concurrency"] for r in rows], [r["output_tok_s"] for r in rows], "o-",
                  label=f"ladle serve (HTTP, {threads} thread{'s' if threads > 1 else ''})")
    left.plot([r["concurrency"] for r in hf], [r["output_tok_s"] for r in hf], "s--",
              label="transformers generate (sequential / static batch)")
    left.set(xscale="log", xlabel="concurrent requests (HF: batch size)", ylabel="output tokens/s",
             title="Output throughput, 128 in / 128 out, bf16")
    left.set_xticks([r["concurrency"] for r in hf], [str(r["concurrency"]) for r in hf])
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    rows = [r for r in ladle if r["threads"] == headline]
    for who, series, color in (("ladle", rows, "tab:orange"), ("transformers", hf, "tab:green")):
        for metric, marker in (("ttft", "o"), ("itl", "s")):
            for q, style in (("p50", "-"), ("p99", ":")):
                right.plot([r["concurrency"] for r in series], [r[f"{q}_{metric}_ms"] for r in series],
                           marker + style, color=color, alpha=1.0 if q == "p50" else 0.6,
                           label=f"{who} {metric.upper()} {q}")
    right.set(xscale="log", yscale="log", xlabel="concurrent requests (HF: batch size)", ylabel="ms",
              title=f"TTFT and ITL percentiles (ladle {headline} thread{'s' if headline > 1 else ''})")
    right.set_xticks([r["concurrency"] for r in rows], [str(r["concurrency"]) for r in rows])
    right.grid(alpha=0.3)
    right.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="ladle --num-threads values to measure")
    ap.add_argument("--headline-threads", type=int, default=2, help="the setting the verdicts use")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--hf-threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model_dir = ensure_checkpoint()
    print("measuring the hardware ...", flush=True)
    hw = hardware.measure(2)
    print(hardware.describe(hw))
    roof = roofline(hw, model_dir)
    thread_counts = [int(t) for t in args.threads.split(",")]
    ladle, hf = measure(model_dir, thread_counts, args.headline_threads, concurrencies, args.max_num_seqs,
                        args.hf_threads)
    table = markdown(ladle, hf, args.headline_threads)
    doc = {"hardware": hw, "roofline": roof, "ladle": ladle, "transformers": hf, "args": vars(args)}
    (OUT / "results.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (OUT / "results.md").write_text(table + "\n")
    plot(ladle, hf, OUT / "throughput.png", args.headline_threads)
    if set(concurrencies) >= {1, 8, 32} and set(thread_counts) >= {1, 2}:  # only a full run replaces the README's plot
        plot(ladle, hf, HERE / "throughput.png", args.headline_threads)
    print(f"\n{hardware.describe(hw)}\nroofline: {roof['params'] / 1e6:.1f}M params, "
          f"{roof['weight_bytes'] / 1e6:.0f} MB bf16 weights -> batch-1 decode >= {roof['batch1_step_ms']:.1f} ms/step "
          f"({roof['batch1_tok_s']:.0f} tok/s); batch-32 compute >= {roof['batch32_step_ms']:.1f} ms/step "
          f"({roof['batch32_tok_s']:,.0f} tok/s)\n\n{table}")


if __name__ == "__main__":
    main()
