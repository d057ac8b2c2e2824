"""The batch path (issue 11): a Batches API job's throughput alone against the real-time path at its best
concurrency, and real-time p99 TTFT at a fixed moderate load with and without a batch running, on one
`ladle serve examples/models` (the demo LLM `smollm2`, the sentence encoder `minilm`).

- Workload: chat completions on smollm2, 200 distinct prompts cycled (workload.py: 50 questions x 4 ways of asking),
  max_tokens 64, greedy, ignore_eos (every answer equally long, so throughputs compare); the same texts one per
  request for minilm's /v1/embeddings.
- A, real-time best: `ladle bench serve` closed loop (streaming) at each --concurrency, each run sized from a warm-up
  wave of c requests to last about --duration s; best = the highest output tok/s. c=4 is measured too, as the
  cap of C's rate.
- B, batch alone: --lines lines uploaded (POST /v1/files), one batch created (POST /v1/batches), followed until
  completed; lines/s and output tok/s (usage.completion_tokens summed over the output file) over the wall time from
  create to completed, against A's best.
- C, TTFT: a Poisson load of streaming chat requests at --rate (default: --rate-share of A's best req/s, at most
  what c=4 sustained) for --ttft-duration s without a batch; then a batch of the same lines is started, and once
  lines are completing the very same load (same seed) runs again; the batch is cancelled afterwards. --rounds
  rounds interleave (without, with, without, with, ...): each round's p99 ratio, and their median.
- Embeddings: real-time /v1/embeddings closed loop at each --embed-concurrency vs an --embed-lines batch alone.

Each measured phase records the CPU time other processes took meanwhile (other load, CPU s/s of the box).
Writes out/batch_path.md and out/batch_path.json (--name) and prints the table.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jobs/batch_path.py [--quick] [--lines 2000] [--max-tokens 64]
        [--concurrency 8,16,32,64] [--duration 25] [--rate R | --rate-share 0.35] [--ttft-duration 40]
        [--rounds 2] [--embed-concurrency 8,16,32] [--embed-lines 2000] [--parts throughput,ttft,embeddings]
        [--server-args="--batch-lines-in-flight 64"] [--model-param smollm2.batch_share=0.5]

--quick: 200 lines and short phases (a smoke run, ~3 minutes). --model-param MODEL.KEY=VALUE serves a copy of the
demo repository (hard links) with that key set in the model's `parameters` (e.g. an LLM's batch_share, which the
server-wide --batch-share flag does not reach for repository LLMs).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path[:0] = [str(HERE), str(BENCH), str(BENCH / "llm")]  # here; hardware.py, spawn.py; quant.py, run.py
import hardware  # noqa: E402
import quant  # noqa: E402  (benchmarks/llm/quant.py: machine info, the GGUF's tokenizer, progress clock)
import run as llm  # noqa: E402  (benchmarks/llm/run.py: ROOT, other-load accounting)
import workload  # noqa: E402
from batch_client import BatchClient, Followed, embeddings_load, engine_counters, engine_delta  # noqa: E402
from spawn import free_port, spawned_server  # noqa: E402

from ladle.bench.serve import ServeBenchConfig  # noqa: E402
from ladle.bench.serve import run as bench_run  # noqa: E402

ROOT = llm.ROOT
OUT = HERE / "out"
REPO = ROOT / "examples" / "models"
LLM, EMBEDDER = "smollm2", "minilm"
CHAT, EMBEDDINGS = "/v1/chat/completions", "/v1/embeddings"
DATASET = OUT / "batch_path-prompts.jsonl"  # the prompts as `ladle bench serve` custom-dataset JSONL
TARGET_THROUGHPUT = 0.9  # batch alone >= 0.9x the real-time path at its best concurrency
TARGET_TTFT = 1.25  # real-time p99 TTFT with a batch running <= 1.25x without
FULL = dict(lines=2000, concurrency="8,16,32,64", duration=25.0, ttft_duration=40.0, rounds=2,
            embed_concurrency="8,16,32", embed_duration=15.0, embed_lines=2000)
QUICK = dict(lines=200, concurrency="8,32", duration=6.0, ttft_duration=12.0, rounds=1,
             embed_concurrency="8,32", embed_duration=4.0, embed_lines=200)
RATE_CAP_CONCURRENCY = 4


# -- the server ------------------------------------------------------------------------------------------------------
def repository(params: list[str]) -> Path:
    """examples/models, or with --model-param a copy of it (files hard-linked) whose configs carry those
    parameters."""
    if not params:
        return REPO
    copy = OUT / "repo"
    shutil.rmtree(copy, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(REPO, copy, copy_function=link)
    for item in params:
        key, sep, raw = item.partition("=")
        model, dot, name = key.partition(".")
        if not sep or not dot or not (copy / model / "config.yaml").is_file():
            raise SystemExit(f"--model-param {item!r}: expected MODEL.KEY=VALUE for a model of {REPO}")
        path = copy / model / "config.yaml"
        path.unlink()  # a hard link: never write through to examples/
        config = yaml.safe_load((REPO / model / "config.yaml").read_text())
        config.setdefault("parameters", {})[name] = yaml.safe_load(raw)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def ensure_demo() -> None:
    if not quant.GGUF.exists():
        print(f"{quant.GGUF.relative_to(ROOT)} is missing: running examples/build_demo.py ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_demo.py")], cwd=ROOT, check=True)


def server_command(repo: Path, data_dir: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "ladle", "serve", str(repo), "--data-dir", str(data_dir), "--log-level", "info",
            *shlex.split(args.server_args)]


# -- real-time chat (`ladle bench serve`) ----------------------------------------------------------------------------
def chat_config(url: str, args: argparse.Namespace, num_prompts: int, seed: int, concurrency: int | None = None,
                rate: float = math.inf, bar: bool = True) -> ServeBenchConfig:
    return ServeBenchConfig(base_url=url, endpoint=CHAT, model=LLM, tokenizer=quant.GGUF_TOKENIZER,
                            dataset_name="custom", dataset_path=DATASET, custom_output_len=args.max_tokens,
                            num_prompts=num_prompts, max_concurrency=concurrency, request_rate=rate, ignore_eos=True,
                            temperature=0.0, seed=seed, metric_percentiles="50,90,99", disable_tqdm=not bar)


def bench_command(config: ServeBenchConfig) -> str:
    words = [".venv/bin/ladle", "bench", "serve", "--base-url", "http://127.0.0.1:PORT", "--endpoint", CHAT,
             "--model", LLM, "--tokenizer", str(quant.GGUF_TOKENIZER.relative_to(ROOT)), "--dataset-name", "custom",
             "--dataset-path", str(DATASET.relative_to(ROOT)), "--custom-output-len", str(config.custom_output_len),
             "--ignore-eos", "--temperature", "0"]
    if config.max_concurrency:
        words += ["--max-concurrency", str(config.max_concurrency)]
    if not math.isinf(config.request_rate):
        words += ["--request-rate", f"{config.request_rate:.3f}"]
    return shlex.join([*words, "--num-prompts", str(config.num_prompts), "--seed", str(config.seed)])


def measured(config: ServeBenchConfig, pids: list[int], client: BatchClient) -> dict[str, Any]:
    before = engine_counters(client, LLM)
    with llm.foreign_cpu(pids) as other:
        result = bench_run(config)
    engine = engine_delta(before, engine_counters(client, LLM), other["phase_s"])
    s = result.summary
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed: {next(r.error for r in result.records if r.error)}")
    return {"requests": s["completed"], "seconds": s["duration"], "req_s": s["request_throughput"],
            "output_tokens": s["total_output_tokens"], "output_tok_s": s["output_throughput"],
            **{k: s[k] for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p50_e2el_ms")},
            "other_load": other["foreign_cpu_s"] / other["phase_s"], "engine": engine,
            "bench_command": bench_command(config)}


def realtime_best(url: str, client: BatchClient, args: argparse.Namespace, pids: list[int],
                  clock: quant.Clock) -> list[dict[str, Any]]:
    """A: closed loops; each measured run is sized from an unmeasured warm-up wave of c requests at c."""
    rows = []
    levels = [(c, False) for c in args.concurrencies]
    if args.rate is None and RATE_CAP_CONCURRENCY not in args.concurrencies:
        levels.insert(0, (RATE_CAP_CONCURRENCY, True))  # only the cap of C's rate, not a candidate for "best"
    for c, reference in levels:
        clock.say(f"A: real-time chat, concurrency {c}: warm-up wave of {c} requests ...")
        started = time.perf_counter()
        bench_run(chat_config(url, args, c, seed=1000 + c, concurrency=c, bar=False))
        estimate = c / (time.perf_counter() - started)
        n = max(2 * c, round(estimate * args.duration))
        clock.say(f"A: concurrency {c}: {n} requests (~{estimate:.1f} req/s in the warm-up) ...")
        row = {"concurrency": c, "reference_only": reference,
               **measured(chat_config(url, args, n, seed=c, concurrency=c), pids, client)}
        clock.say(f"A: concurrency {c}: {row['req_s']:.2f} req/s, {row['output_tok_s']:.1f} out tok/s, TTFT p50 "
                  f"{row['p50_ttft_ms']:.0f} ms, other load {row['other_load']:.2f}")
        rows.append(row)
    return rows


# -- batches ---------------------------------------------------------------------------------------------------------
def batch_alone(client: BatchClient, file_id: str, endpoint: str, lines: int, pids: list[int], clock: quant.Clock,
                poll_s: float) -> dict[str, Any]:
    """B: one batch from create to completed with nothing else running."""
    clock.say(f"B: batch of {lines} {endpoint} lines alone: creating ...")
    before = engine_counters(client, LLM)
    with llm.foreign_cpu(pids) as other:
        followed = client.create(file_id, endpoint)
        client.follow(followed, poll_s=poll_s, desc=f"batch {endpoint}")
    engine = engine_delta(before, engine_counters(client, LLM), other["phase_s"])
    batch = followed.batch
    wall = followed.seen.get(batch["status"], time.perf_counter()) - followed.created
    if batch["status"] != "completed":
        raise RuntimeError(f"the batch ended {batch['status']}: {batch.get('errors')}")
    stats = client.output_stats(batch["output_file_id"])
    counts = batch["request_counts"]
    in_progress = followed.seen.get("in_progress")
    row = {"endpoint": endpoint, "batch_id": batch["id"], "lines": counts["total"], "completed": counts["completed"],
           "failed": counts["failed"], "seconds": wall,
           "validating_s": (in_progress - followed.created) if in_progress else None,
           "lines_s": counts["completed"] / wall, "output_tokens": stats["completion_tokens"],
           "prompt_tokens": stats["prompt_tokens"], "output_tok_s": stats["completion_tokens"] / wall,
           "statuses": stats["statuses"], "other_load": other["foreign_cpu_s"] / other["phase_s"],
           **({"engine": engine} if endpoint == CHAT else {})}
    clock.say(f"B: {counts['completed']}/{counts['total']} lines in {wall:.1f} s: {row['lines_s']:.2f} lines/s"
              + (f", {row['output_tok_s']:.1f} out tok/s" if endpoint == CHAT else "")
              + f", other load {row['other_load']:.2f}")
    return row


def cancel(client: BatchClient, batch_id: str, poll_s: float) -> dict[str, Any]:
    """Cancel a batch and wait until it is cancelled (its running lines aborted)."""
    followed = Followed(client.cancel(batch_id), time.perf_counter())
    return client.follow(followed, poll_s=poll_s, timeout_s=120, desc="cancelling", bar=False).batch


# -- C: real-time TTFT with and without a batch ---------------------------------------------------------------------
def ttft_rounds(url: str, client: BatchClient, file_id: str, rate: float, args: argparse.Namespace,
                pids: list[int], clock: quant.Clock) -> list[dict[str, Any]]:
    n = max(10, round(rate * args.ttft_duration))
    rows = []
    for rnd in range(1, args.rounds + 1):
        config = chat_config(url, args, n, seed=500 + rnd, rate=rate)
        clock.say(f"C: round {rnd}/{args.rounds}, without a batch: {n} streaming requests at {rate:.2f} req/s ...")
        row = {"round": rnd, "batch": False, **measured(config, pids, client)}
        clock.say(f"C: round {rnd} without: TTFT p50 {row['p50_ttft_ms']:.0f} ms, p99 {row['p99_ttft_ms']:.0f} ms, "
                  f"other load {row['other_load']:.2f}")
        rows.append(row)

        clock.say(f"C: round {rnd}, with a batch: starting a {args.lines}-line batch, waiting for its lines ...")
        followed = client.create(file_id, CHAT)
        client.follow(followed, until=lambda b: b["status"] == "in_progress" and b["request_counts"]["completed"] > 0,
                      poll_s=args.poll, desc="batch starting")
        if followed.batch["status"] != "in_progress":
            raise RuntimeError(f"the phase C batch ended {followed.batch['status']} before the load started")
        before, t0 = followed.batch["request_counts"]["completed"], time.perf_counter()
        clock.say(f"C: round {rnd} with a batch ({before} lines done so far): the same {n} requests ...")
        row = {"round": rnd, "batch": True, **measured(config, pids, client)}
        after = client.get(followed.batch["id"])
        window = time.perf_counter() - t0
        row.update(batch_id=after["id"], batch_status_after=after["status"],
                   batch_lines_in_window=after["request_counts"]["completed"] - before,
                   batch_lines_s_in_window=(after["request_counts"]["completed"] - before) / window)
        final = cancel(client, after["id"], args.poll)
        row["batch_final_status"] = final["status"]
        row["p99_vs_without"] = row["p99_ttft_ms"] / rows[-1]["p99_ttft_ms"]
        row["p50_vs_without"] = row["p50_ttft_ms"] / rows[-1]["p50_ttft_ms"]
        clock.say(f"C: round {rnd} with: TTFT p50 {row['p50_ttft_ms']:.0f} ms, p99 {row['p99_ttft_ms']:.0f} ms "
                  f"({row['p99_vs_without']:.2f}x without); {row['batch_lines_in_window']} batch lines completed "
                  f"meanwhile; batch {final['status']}; other load {row['other_load']:.2f}")
        rows.append(row)
        time.sleep(2.0)  # the cancelled lines' last steps
    return rows


# -- embeddings --------------------------------------------------------------------------------------------------------
def embeddings_realtime(url: str, args: argparse.Namespace, pids: list[int],
                        clock: quant.Clock) -> list[dict[str, Any]]:
    bodies = [workload.embedding_body(EMBEDDER, t) for t in workload.prompts()]
    rows = []
    for c in args.embed_concurrencies:
        clock.say(f"E: real-time /v1/embeddings, concurrency {c}, {args.embed_duration:.0f} s ...")
        with llm.foreign_cpu(pids) as other:
            row = embeddings_load(url, bodies, c, args.embed_duration)
        row["other_load"] = other["foreign_cpu_s"] / other["phase_s"]
        if row["failed"]:
            raise RuntimeError(f"{row['failed']} embeddings requests failed at concurrency {c}")
        clock.say(f"E: concurrency {c}: {row['req_s']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, p99 "
                  f"{row['p99_ms']:.1f} ms, other load {row['other_load']:.2f}")
        rows.append(row)
    return rows


# -- the report -------------------------------------------------------------------------------------------------------
def summarize(doc: dict[str, Any]) -> None:
    """Best rows, ratios and target verdicts onto the document."""
    targets = []
    if doc.get("realtime"):
        candidates = [r for r in doc["realtime"] if not r["reference_only"]]
        best = max(candidates, key=lambda r: r["output_tok_s"])
        doc["realtime_best"] = best
        b = doc["batch"]
        b["vs_realtime_tok_s"] = b["output_tok_s"] / best["output_tok_s"]
        b["vs_realtime_req_s"] = b["lines_s"] / best["req_s"]
        targets.append({"name": f"{LLM} batch alone vs real-time best (out tok/s)",
                        "target": f">= {TARGET_THROUGHPUT}x", "measured": b["vs_realtime_tok_s"],
                        "met": b["vs_realtime_tok_s"] >= TARGET_THROUGHPUT})
    if doc.get("ttft"):
        with_rows = [r for r in doc["ttft"] if r["batch"]]
        ratios = [r["p99_vs_without"] for r in with_rows]
        doc["ttft_median"] = {
            "p99_vs_without": statistics.median(ratios),
            "p50_vs_without": statistics.median(r["p50_vs_without"] for r in with_rows),
            "p99_without_ms": statistics.median(r["p99_ttft_ms"] for r in doc["ttft"] if not r["batch"]),
            "p99_with_ms": statistics.median(r["p99_ttft_ms"] for r in with_rows),
            "batch_lines_in_window": statistics.median(r["batch_lines_in_window"] for r in with_rows)}
        med = doc["ttft_median"]["p99_vs_without"]
        targets.append({"name": f"{LLM} real-time p99 TTFT with a batch running vs without (median of rounds)",
                        "target": f"<= {TARGET_TTFT}x", "measured": med,
                        "met": med <= TARGET_TTFT and all(r["batch_lines_in_window"] > 0 for r in with_rows)})
    if doc.get("embed_realtime"):
        best = max(doc["embed_realtime"], key=lambda r: r["req_s"])
        doc["embed_best"] = best
        e = doc["embed_batch"]
        e["vs_realtime_req_s"] = e["lines_s"] / best["req_s"]
        targets.append({"name": f"{EMBEDDER} batch alone vs real-time best (texts/s)",
                        "target": f">= {TARGET_THROUGHPUT}x", "measured": e["vs_realtime_req_s"],
                        "met": e["vs_realtime_req_s"] >= TARGET_THROUGHPUT})
    doc["targets"] = targets


def _f(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _lines_in_window(row: dict[str, Any]) -> str:
    """Lines the batch finished during the measured load; flagged when the batch ran out before the load did."""
    ended = row["batch_status_after"] != "in_progress"
    return f"{row['batch_lines_in_window']}" + (f" (batch {row['batch_status_after']} before the end)" if ended else "")


def _engine(row: dict[str, Any]) -> str:
    e = row.get("engine")
    if not e or not e["steps"]:
        return "-"
    return f"{e['tokens_per_step']:.1f} · {e['ms_per_step']:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    a = doc["args"]
    lines = ["## Batch path (`benchmarks/jobs/batch_path.py`)", "",
             f"Machine: {quant.describe_machine(doc['machine'])}; {hardware.describe(doc['hardware'])}.",
             f"Workload: chat on `{LLM}` (200 distinct prompts cycled, max_tokens {a['max_tokens']}, greedy, "
             f"ignore_eos); `{EMBEDDER}` one text per request. Other load: CPU s/s other processes used during the "
             "phase (0 = quiet).", ""]
    if doc.get("realtime"):
        best = doc["realtime_best"]
        b = doc["batch"]
        lines += ["### Throughput: batch alone vs the real-time path", "",
                  "| model | path | c | requests | seconds | req/s | out tok/s | vs real-time best | TTFT p50 / p99 ms "
                  "| engine tok/step · ms/step | other load |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for r in doc["realtime"]:
            mark = "**" if r is best else ""
            label = "real-time (rate cap of C)" if r["reference_only"] else "real-time"
            lines.append(f"| {LLM} | {label} | {r['concurrency']} | {r['requests']} | {r['seconds']:.1f} | "
                         f"{r['req_s']:.2f} | {mark}{r['output_tok_s']:,.1f}{mark} | "
                         f"{r['output_tok_s'] / best['output_tok_s']:.2f}x | {r['p50_ttft_ms']:,.0f} / "
                         f"{r['p99_ttft_ms']:,.0f} | {_engine(r)} | {r['other_load']:.2f} |")
        lines.append(f"| {LLM} | **batch alone** | - | {b['completed']} | {b['seconds']:.1f} | {b['lines_s']:.2f} | "
                     f"**{b['output_tok_s']:,.1f}** | **{b['vs_realtime_tok_s']:.2f}x** | - | {_engine(b)} | "
                     f"{b['other_load']:.2f} |")
    if doc.get("embed_realtime"):
        best = doc["embed_best"]
        e = doc["embed_batch"]
        if not doc.get("realtime"):
            lines += ["| model | path | c | requests | seconds | req/s | out tok/s | vs real-time best | latency "
                      "p50 / p99 ms | engine | other load |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for r in doc["embed_realtime"]:
            mark = "**" if r is best else ""
            lines.append(f"| {EMBEDDER} | real-time | {r['concurrency']} | {r['requests']} | {r['seconds']:.1f} | "
                         f"{mark}{r['req_s']:.1f}{mark} | - | {r['req_s'] / best['req_s']:.2f}x | "
                         f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} (latency) | - | {r['other_load']:.2f} |")
        lines.append(f"| {EMBEDDER} | **batch alone** | - | {e['completed']} | {e['seconds']:.1f} | "
                     f"**{e['lines_s']:.1f}** | - | **{e['vs_realtime_req_s']:.2f}x** | - | - | "
                     f"{e['other_load']:.2f} |")
    if doc.get("realtime") or doc.get("embed_realtime"):
        lines += ["", "req/s: requests (batch: lines) completed / wall time; a batch's wall time runs from POST "
                  "/v1/batches to the first poll that saw it completed (validation included: "
                  + ", ".join(f"{x['endpoint']} {x['validating_s']:.1f} s" for x in (doc.get("batch"),
                                                                                    doc.get("embed_batch"))
                              if x and x.get("validating_s") is not None)
                  + "). out tok/s: the real-time runs' streamed tokens, the batch's usage.completion_tokens summed "
                  "over its output file. vs real-time best: over the best real-time row (bold) of the same model. "
                  "engine: the LLM engine's tokens per step (prefill + decode) and wall ms per step over the phase "
                  "(from /metrics).", ""]
    if doc.get("ttft"):
        med = doc["ttft_median"]
        lines += [f"### Real-time TTFT at {doc['rate']:.2f} req/s (Poisson, streaming) with and without a batch", "",
                  f"Rate: {doc['rate_note']}. Each round runs the same requests (same seed) without, then with a "
                  f"{a['lines']}-line batch of the same workload running (started first, measured once its lines "
                  "complete; cancelled afterwards).", "",
                  "| round | batch running | requests | req/s | TTFT p50 ms | TTFT p99 ms | p99 vs without | "
                  "batch lines done in the window | batch lines/s | engine tok/step | steps > 256 tok | preemptions | "
                  "other load |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in doc["ttft"]:
            with_batch = r["batch"]
            lines.append(f"| {r['round']} | {'yes' if with_batch else 'no'} | {r['requests']} | {r['req_s']:.2f} | "
                         f"{r['p50_ttft_ms']:,.0f} | {r['p99_ttft_ms']:,.0f} | "
                         f"{_f(r.get('p99_vs_without'), '.2f') + 'x' if with_batch else '-'} | "
                         f"{_lines_in_window(r) if with_batch else '-'} | "
                         f"{_f(r.get('batch_lines_s_in_window'), '.2f') if with_batch else '-'} | "
                         f"{_f(r['engine']['tokens_per_step'])} | {_f(r['engine'].get('steps_over_256'), 'g')} | "
                         f"{r['engine']['preemptions']:g} | "
                         f"{r['other_load']:.2f} |")
        lines.append(f"| median | | | | | without {med['p99_without_ms']:,.0f} / with {med['p99_with_ms']:,.0f} | "
                     f"**{med['p99_vs_without']:.2f}x** | {med['batch_lines_in_window']:g} | | | | | |")
    if doc["targets"]:
        lines += ["", "Targets:", ""]
        for t in doc["targets"]:
            lines.append(f"- {t['name']} {t['target']}: {t['measured']:.2f}x, {'met' if t['met'] else 'NOT met'}")
    lines += ["", "Commands:", "", "```", doc["command"], doc["server_command"],
              *dict.fromkeys(r["bench_command"] for r in doc.get("realtime", []) + doc.get("ttft", [])), "```", "",
              f"Total {doc['seconds']:.0f} s."]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 lines, short phases, one round")
    ap.add_argument("--lines", type=int, help="lines of the chat batch (default 2000; --quick 200)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every chat request (ignore_eos)")
    ap.add_argument("--concurrency", help="A's closed-loop concurrencies (default 8,16,32,64; --quick 8,32)")
    ap.add_argument("--duration", type=float, help="A: seconds each measured run should last (default 25)")
    ap.add_argument("--rate", type=float, help="C's request rate in req/s (default: --rate-share of A's best req/s, "
                    f"at most what c={RATE_CAP_CONCURRENCY} sustained)")
    ap.add_argument("--rate-share", type=float, default=0.35, help="C's default rate as a share of A's best req/s")
    ap.add_argument("--ttft-duration", type=float, help="C: seconds of each load (default 40)")
    ap.add_argument("--rounds", type=int, help="C: rounds of without + with a batch (default 2; --quick 1)")
    ap.add_argument("--embed-concurrency", help="real-time embeddings concurrencies (default 8,16,32)")
    ap.add_argument("--embed-duration", type=float, help="seconds of each real-time embeddings run (default 15)")
    ap.add_argument("--embed-lines", type=int, help="lines of the embeddings batch (default 2000; --quick 200)")
    ap.add_argument("--parts", default="throughput,ttft,embeddings",
                    help="what to run: throughput (A and B), ttft (C; alone it needs --rate), embeddings; llm = "
                    "throughput,ttft")
    ap.add_argument("--server-args", default="", help="extra `ladle serve` flags, one string")
    ap.add_argument("--model-param", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="serve a copy of the demo repository with this model parameter set (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the hardware probe")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between polls of a batch")
    ap.add_argument("--name", default="batch_path", help="write out/NAME.md, out/NAME.json and out/NAME-server.log")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.embed_concurrencies = [int(c) for c in args.embed_concurrency.split(",")]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if "llm" in parts:
        parts = (parts - {"llm"}) | {"throughput", "ttft"}
    if parts - {"throughput", "ttft", "embeddings"} or not parts:
        ap.error("--parts: choose from throughput, ttft, embeddings (llm = throughput,ttft)")
    if "ttft" in parts and "throughput" not in parts and args.rate is None:
        ap.error("--parts ttft without throughput needs --rate (C's default rate comes from A)")
    args.parts = sorted(parts)
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the server too (the with blocks unwind)
    argv = sys.argv[1:]
    args = parse_args(argv)
    clock = quant.Clock()
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_demo()
    host = quant.machine()
    clock.say(quant.describe_machine(host))
    quant.gguf_config()  # saves the GGUF's tokenizer for the bench client once
    workload.write_bench_dataset(DATASET)
    clock.say("measuring the hardware ...")
    hw = hardware.measure(args.threads)
    clock.say(hardware.describe(hw))
    repo = repository(args.model_param)
    log = OUT / f"{args.name}-server.log"
    log.write_bytes(b"")
    doc: dict[str, Any] = {"machine": host, "hardware": hw, "argv": argv,
                           "args": {k: v for k, v in vars(args).items()},
                           "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jobs/batch_path.py "
                                      f"{shlex.join(argv)}".rstrip()}
    with tempfile.TemporaryDirectory(prefix="ladle-batch-path-") as tmp, contextlib.ExitStack() as stack:
        data_dir = Path(tmp) / "data"
        command = server_command(repo, data_dir, args)
        doc["server_command"] = quant.shown(command).replace(str(data_dir), "TMPDIR") + " --port PORT"
        clock.say(f"starting `{doc['server_command']}` ...")
        spawned = stack.enter_context(spawned_server(command, log, port=free_port(), timeout_s=300, poll_s=0.2))
        doc["ready_s"] = spawned.ready_s
        url, pids = spawned.url, [os.getpid(), spawned.process.pid]
        client = BatchClient(url)
        stack.callback(client.close)
        clock.say(f"ready in {spawned.ready_s:.1f} s; warming up ...")
        if "throughput" in args.parts or "ttft" in args.parts:
            bench_run(chat_config(url, args, 4, seed=2000, concurrency=2, bar=False))
            path = OUT / "batch_path-chat.jsonl"
            size = workload.write_batch_input(path, CHAT, LLM, args.lines, args.max_tokens)
            clock.say(f"uploading {path.name}: {args.lines} lines, {size / 1e6:.2f} MB ...")
            chat_file = client.upload(path)
        if "throughput" in args.parts:
            doc["realtime"] = realtime_best(url, client, args, pids, clock)
            doc["batch"] = batch_alone(client, chat_file, CHAT, args.lines, pids, clock, args.poll)
        if "ttft" in args.parts:
            if args.rate is not None:
                doc["rate"], doc["rate_note"] = args.rate, f"--rate {args.rate:g}"
            else:
                best = max((r for r in doc["realtime"] if not r["reference_only"]), key=lambda r: r["output_tok_s"])
                cap = next((r["req_s"] for r in doc["realtime"] if r["concurrency"] == RATE_CAP_CONCURRENCY), None)
                share = args.rate_share * best["req_s"]
                doc["rate"] = min(share, cap) if cap else share
                doc["rate_note"] = (f"{args.rate_share:.0%} of the best real-time {best['req_s']:.2f} req/s = "
                                    f"{share:.2f}" + (f", capped at c={RATE_CAP_CONCURRENCY}'s {cap:.2f} req/s"
                                                      if cap else "")
                                    + f" -> {doc['rate']:.2f} req/s")
            doc["ttft"] = ttft_rounds(url, client, chat_file, doc["rate"], args, pids, clock)
        if "embeddings" in args.parts:
            for text in workload.prompts()[:8]:  # first calls load kernels
                client.http.post("/v1/embeddings", json=workload.embedding_body(EMBEDDER, text))
            path = OUT / "batch_path-embeddings.jsonl"
            size = workload.write_batch_input(path, EMBEDDINGS, EMBEDDER, args.embed_lines)
            clock.say(f"uploading {path.name}: {args.embed_lines} lines, {size / 1e6:.2f} MB ...")
            embed_file = client.upload(path)
            doc["embed_realtime"] = embeddings_realtime(url, args, pids, clock)
            doc["embed_batch"] = batch_alone(client, embed_file, EMBEDDINGS, args.embed_lines, pids, clock,
                                             args.poll)
    doc["seconds"] = time.perf_counter() - clock.started
    summarize(doc)
    text = markdown(doc)
    (OUT / f"{args.name}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
    (OUT / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
