"""Speculative decoding vs none, in one run: `ladle serve` output tok/s (output tokens / wall time), TPOT p50 and the
draft acceptance rate (accepted / drafted tokens, the delta of the server's /metrics counters over each measured run)
at 1, 4 and 16 concurrent requests, for the demo SmolLM2-135M-Instruct Q4_1 GGUF served with speculation off, with
`--speculative-method ngram` (prompt lookup) and, when selected, with a draft checkpoint (`--speculative-model`).
Two workloads, both driven by `ladle bench serve`:

- grounded: chat requests asking to repeat, quote, extract from or rewrite a passage of a public-domain US document
  (grounded_passages.py: 25 passages x 8 instructions), greedy, max_tokens 128, stopping at EOS: output the prompt
  already holds, the case prompt lookup is for;
- random: random prompt token ids, 128 in / 128 out, ignore_eos (quant.py's and run.py's workload): nothing in the
  prompt to copy (but a small model's output on such prompts soon repeats itself, and lookup drafts that too).

Ratios are vs speculation off at the same workload and concurrency. Every config's server runs at once (idle ones
cost nothing) and each cell is measured on every config in turn, `--rounds` times, keeping each config's best round:
this shared box drifts by +-20% over minutes, and interleaving puts the drift on all configs alike. Writes
out/speculative.md and out/speculative.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/speculative.py [--configs off,ngram[,draft]]
        [--concurrency 1,4,16] [--workloads grounded,random] [--num-prompts-factor 2] [--threads 2]
        [--num-speculative-tokens 4] [--draft-model PATH] [--rounds 2]

The draft config (a smaller checkpoint sharing the GGUF's tokenizer) is not run by default: select it with
`--configs off,ngram,draft --draft-model PATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # quant.py, run.py, grounded_passages.py; hardware.py and spawn.py
import hardware  # noqa: E402
import quant  # noqa: E402  (benchmarks/llm/quant.py: the GGUF and its tokenizer, machine info, progress clock)
import run as llm  # noqa: E402  (benchmarks/llm/run.py: paths, 128 in / 128 out, other-load accounting)
from grounded_passages import PASSAGES, TEMPLATES  # noqa: E402
from spawn import free_port, spawned_server  # noqa: E402

from ladle.bench.serve import ServeBenchConfig  # noqa: E402
from ladle.bench.serve import run as bench_run  # noqa: E402

SERVED_NAME = "smollm2"
GROUNDED_JSONL = llm.OUT / "speculative-grounded.jsonl"  # the grounded prompts, as `ladle bench serve --dataset-path`
GROUNDED_OUTPUT_LEN = 128
WORKLOADS = ("grounded", "random")
DEFAULT_CONFIGS = "off,ngram"
MIN_PROMPTS = 8  # measured requests = max(8, factor x c): c=1 sees 8 different prompts, not 4
SPEC_METRIC = re.compile(r"^ladle_llm_spec_decode_(draft|accepted)_tokens(_per_pos)?_total\{([^}]*)\}\s+(\S+)$",
                         re.MULTILINE)
# (config, workload, concurrency, min tok/s vs off): prompt lookup pays on grounded text at c=1 and must cost
# (almost) nothing where it has nothing to look up (random) or where batching already fills the cores (c=16)
TARGETS = (("ngram", "grounded", 1, 1.5), ("ngram", "random", 1, 0.95), ("ngram", "random", 4, 0.95),
           ("ngram", "random", 16, 0.95), ("ngram", "grounded", 16, 0.95))


@dataclass(frozen=True)
class ServerConfig:
    """One `ladle serve` configuration: a row group of the table."""

    name: str  # what --configs selects and the table shows
    method: str  # ladle's --speculative-method
    options: tuple[str, ...]  # the speculation options on the command line


def all_configs(args: argparse.Namespace) -> dict[str, ServerConfig]:
    k = ("--num-speculative-tokens", str(args.num_speculative_tokens))
    draft = ("--speculative-method", "draft_model", "--speculative-model", str(args.draft_model), *k)
    configs = [ServerConfig("off", "none", ()), ServerConfig("ngram", "ngram", ("--speculative-method", "ngram", *k)),
               ServerConfig("draft", "draft_model", draft)]
    return {c.name: c for c in configs}


def select_configs(args: argparse.Namespace) -> list[ServerConfig]:
    known = all_configs(args)
    chosen = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(known)}")
    if "draft" in chosen and args.draft_model is None:
        raise SystemExit("--configs draft needs --draft-model PATH (a checkpoint sharing the GGUF's tokenizer)")
    if "off" not in chosen:
        print("note: without the off config there are no ratios and no target verdicts", file=sys.stderr)
    return [known[n] for n in chosen]


# -- workloads -----------------------------------------------------------------------------------------------------
def grounded_prompts() -> list[str]:
    """Every instruction over every passage: 200 user messages, shuffled per run by the bench's seed."""
    return [template.format(passage=passage) for passage in PASSAGES for template in TEMPLATES]


def write_grounded() -> None:
    lines = [orjson.dumps({"prompt": p}) for p in grounded_prompts()]
    GROUNDED_JSONL.write_bytes(b"\n".join(lines) + b"\n")


def bench_config(url: str, workload: str, c: int, num_prompts: int, seed: int) -> ServeBenchConfig:
    """grounded: chat, greedy, stops at EOS (max_tokens 128); random: run.py's 128 in / 128 out with ignore_eos."""
    common = dict(base_url=url, model=SERVED_NAME, tokenizer=quant.GGUF_TOKENIZER, num_prompts=num_prompts,
                  max_concurrency=c, num_warmups=0, temperature=0.0, seed=seed, metric_percentiles="50,90,99",
                  disable_tqdm=True)
    if workload == "grounded":
        return ServeBenchConfig(endpoint="/v1/chat/completions", dataset_name="custom", dataset_path=GROUNDED_JSONL,
                                custom_output_len=GROUNDED_OUTPUT_LEN, ignore_eos=False, **common)
    return ServeBenchConfig(dataset_name="random", random_input_len=llm.INPUT_LEN,
                            random_output_len=llm.OUTPUT_LEN, ignore_eos=True, **common)


def bench_command(config: ServeBenchConfig) -> str:
    """The measured run as a person types it (its warm-up was the same command with --seed + 1000); PORT is the
    server's (a free one per server)."""
    words = [".venv/bin/ladle", "bench", "serve", "--base-url", "http://127.0.0.1:PORT", "--model", SERVED_NAME,
             "--tokenizer", str(quant.GGUF_TOKENIZER.relative_to(llm.ROOT))]
    if config.dataset_name == "custom":
        words += ["--endpoint", config.endpoint, "--dataset-name", "custom", "--dataset-path",
                  str(GROUNDED_JSONL.relative_to(llm.ROOT)), "--custom-output-len", str(config.custom_output_len)]
    else:
        words += ["--dataset-name", "random", "--random-input-len", str(config.random_input_len),
                  "--random-output-len", str(config.random_output_len), "--ignore-eos"]
    return shlex.join([*words, "--temperature", "0", "--max-concurrency", str(config.max_concurrency),
                       "--num-prompts", str(config.num_prompts), "--seed", str(config.seed)])


# -- the server's speculation counters -------------------------------------------------------------------------------
def spec_counters(url: str) -> dict[str, Any] | None:
    """Drafted and accepted token totals (and per draft position) from GET /metrics; None when the server has no
    such metrics (acceptance then reads n/a). A family with no sample yet (nothing drafted) counts as 0."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode(errors="replace") if response.status == 200 else ""
    except OSError:
        text = ""
    finally:
        connection.close()
    if "ladle_llm_spec_decode_draft_tokens" not in text:
        return None
    out: dict[str, Any] = {"draft": 0.0, "accepted": 0.0, "draft_pos": {}, "accepted_pos": {}}
    for kind, per_pos, labels, value in SPEC_METRIC.findall(text):
        if per_pos:
            position = int(re.search(r'position="(\d+)"', labels).group(1))
            table = out[f"{kind}_pos"]
            table[position] = table.get(position, 0.0) + float(value)
        else:
            out[kind] += float(value)
    return out


def counter_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Acceptance over one run: accepted / drafted, overall and per draft position (None where nothing was drafted
    or the server has no such metrics)."""
    if before is None or after is None:
        return {"draft_tokens": None, "accepted_tokens": None, "acceptance": None, "acceptance_by_pos": None}
    drafted, accepted = after["draft"] - before["draft"], after["accepted"] - before["accepted"]
    by_pos = {}
    for position in sorted(after["draft_pos"]):
        d = after["draft_pos"][position] - before["draft_pos"].get(position, 0.0)
        a = after["accepted_pos"].get(position, 0.0) - before["accepted_pos"].get(position, 0.0)
        if d > 0:
            by_pos[position] = a / d
    return {"draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance": accepted / drafted if drafted > 0 else None, "acceptance_by_pos": by_pos or None}


# -- measuring -----------------------------------------------------------------------------------------------------
def server_command(cfg: ServerConfig, threads: int, max_num_seqs: int) -> list[str]:
    """The GGUF as it is (auto dtype and quantization); 1024 tokens of context fit the longest grounded prompt
    (~400 tokens with the chat template) plus 128 out."""
    return [sys.executable, "-m", "ladle", "serve", "--model", str(quant.GGUF), "--served-model-name", SERVED_NAME,
            "--num-threads", str(threads), "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", "2048",
            "--max-model-len", "1024", "--kv-cache-memory", "512MiB", "--log-level", "info", *cfg.options]


def measure_once(cfg: ServerConfig, workload: str, c: int, args: argparse.Namespace, url: str,
                 server_pid: int) -> tuple[dict[str, Any], dict[int, str]]:
    """One (workload, concurrency): an unmeasured warm-up at the same concurrency on other prompts (seed + 1000),
    then the measured run between two reads of the speculation counters. Returns the row and each request's text."""
    num_prompts = max(MIN_PROMPTS, args.num_prompts_factor * c)
    config = bench_config(url, workload, c, num_prompts, seed=c)
    warm = bench_config(url, workload, c, min(c, 8), seed=c + 1000)
    bench_run(warm)
    before = spec_counters(url)
    with llm.foreign_cpu([os.getpid(), server_pid]) as other:
        result = bench_run(config)
    after = spec_counters(url)
    s = result.summary
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed: {next(r.error for r in result.records if r.error)}")
    (llm.OUT / f"speculative-{cfg.name}-{workload}-c{c}.json").write_bytes(result.to_json())
    row = {"config": cfg.name, "workload": workload, "concurrency": c, "requests": s["completed"],
           "seconds": s["duration"], "input_tokens": s["total_input_tokens"], "output_tokens": s["total_output_tokens"],
           "output_tok_s": s["output_throughput"], **counter_delta(before, after), **other,
           **{k: v for k, v in s.items() if k.endswith("_ms")}, "bench_command": bench_command(config)}
    return row, {r.index: r.generated_text for r in result.records}


def warm_up(url: str, workloads: list[str]) -> None:
    """A couple of requests of each workload right after start: first calls allocate and pick kernels."""
    for workload in workloads:
        bench_run(bench_config(url, workload, 2, 2, seed=2000))


LOG_PATTERNS = {
    "speculation": re.compile(r"speculative decoding \(.*"),
    "draft": re.compile(r"draft model .*"),
    "dtype": re.compile(r"dtype (\w+) \((.*)\)"),
}


def parse_log(text: str) -> dict[str, Any]:
    """What the server logged about speculation (its step-cost probe, the draft model) and its dtype."""
    return {k: m.group(0).strip() for k, p in LOG_PATTERNS.items() if (m := p.search(text))}


def start_server(cfg: ServerConfig, args: argparse.Namespace, stack: contextlib.ExitStack,
                 clock: quant.Clock) -> tuple[dict[str, Any], Any]:
    """Start one config's server (it lives until `stack` closes) and warm it up. A server that refuses to start
    (e.g. a draft model it cannot load) gives a record with `error` and no server."""
    command = server_command(cfg, args.threads, max(args.max_num_seqs, *args.concurrencies))
    log_path = llm.OUT / f"speculative-server-{cfg.name}.log"
    log_path.write_bytes(b"")
    server: dict[str, Any] = {"config": cfg.name, "command": quant.shown(command) + " --port PORT",
                              "log": str(log_path.relative_to(llm.ROOT)), "log_path": log_path}
    clock.say(f"{cfg.name}: starting `{server['command']}`")
    try:
        spawned = stack.enter_context(spawned_server(command, log_path, port=free_port(), timeout_s=300, poll_s=0.2))
    except RuntimeError:
        server["error"] = quant.last_error(log_path)
        clock.say(f"{cfg.name}: FAILED ({server['error']})")
        return server, None
    server["ready_s"] = spawned.ready_s
    clock.say(f"{cfg.name}: ready in {spawned.ready_s:.1f} s; warming up ...")
    warm_up(spawned.url, args.workloads)
    return server, spawned


def measure_all(configs: list[ServerConfig], args: argparse.Namespace, clock: quant.Clock
                ) -> tuple[list[dict], list[dict], dict[tuple, dict[int, str]]]:
    """Every config's server runs at once (an idle one costs nothing), and each (workload, concurrency) is measured
    on every config in turn, `--rounds` times: slow drifts of this shared box then hit all configs alike. A row is
    the config's best round (noise only ever slows a run down)."""
    servers, rows, texts = [], [], {}
    with contextlib.ExitStack() as stack:
        live = []
        for cfg in configs:
            server, spawned = start_server(cfg, args, stack, clock)
            servers.append(server)
            if spawned is not None:
                live.append((cfg, server, spawned))
        for workload in args.workloads:
            for c in args.concurrencies:
                best: dict[str, tuple[dict, dict[int, str]]] = {}
                for rnd in range(args.rounds):
                    for cfg, _, spawned in live:
                        clock.say(f"{cfg.name}: {workload}, concurrency {c}, round {rnd + 1}/{args.rounds} ...")
                        row, out = measure_once(cfg, workload, c, args, spawned.url, spawned.process.pid)
                        clock.say(f"{cfg.name}: {workload} c={c} {row['output_tok_s']:.1f} tok/s, TPOT p50 "
                                  f"{row['p50_tpot_ms']:.1f} ms, acceptance {_acceptance(row)}")
                        if cfg.name not in best or row["output_tok_s"] > best[cfg.name][0]["output_tok_s"]:
                            best[cfg.name] = (row, out)
                for cfg, _, _ in live:
                    rows.append(best[cfg.name][0])
                    texts[(cfg.name, workload, c)] = best[cfg.name][1]
        for _, server, spawned in live:  # VmHWM is gone with the process: read it before the servers stop
            if spawned.process.poll() is None:
                server["memory_kb"] = quant.memory_kb(spawned.process.pid)
    for server in servers:
        server.update(parse_log(server.pop("log_path").read_text(errors="replace")))
    return servers, rows, texts


# -- report --------------------------------------------------------------------------------------------------------
def annotate(rows: list[dict], texts: dict[tuple, dict[int, str]]) -> None:
    """Ratios vs off at the same workload and concurrency, drafted tokens per output token, and the share of
    requests whose text equals off's (greedy: speculation should not change it; batch numerics may)."""
    base = {(r["workload"], r["concurrency"]): r for r in rows if r["config"] == "off"}
    for r in rows:
        key = (r["workload"], r["concurrency"])
        b = base.get(key)
        r["vs_off"] = r["output_tok_s"] / b["output_tok_s"] if b else None
        r["tpot_vs_off"] = r["p50_tpot_ms"] / b["p50_tpot_ms"] if b and b["p50_tpot_ms"] else None
        drafted = r["draft_tokens"]
        r["drafted_per_output_token"] = drafted / r["output_tokens"] if drafted is not None else None
        mine, off = texts.get((r["config"], *key)), texts.get(("off", *key))
        same = [mine[i] == off[i] for i in mine if i in off] if mine and off and r["config"] != "off" else []
        r["same_text_as_off"] = sum(same) / len(same) if same else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _acceptance(row: dict[str, Any]) -> str:
    if row["draft_tokens"] is None:
        return "n/a"  # the server has no speculation metrics
    return "none drafted" if not row["draft_tokens"] else f"{row['acceptance']:.0%}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(servers: list[dict], rows: list[dict], configs: list[ServerConfig]) -> str:
    info = {s["config"]: s for s in servers}
    lines = ["| config | workload | c | out tok/s | vs off | TPOT p50 ms | TPOT vs off | acceptance | by position | "
             "drafted / out tok | same text as off | TTFT p50 ms | other load |", "|---|---|" + "---:|" * 11]
    for cfg in configs:
        s = info[cfg.name]
        if "error" in s:
            lines.append(f"| {cfg.name} | - | - | failed: {s['error'][:160]} | | | | | | | | | |")
        for r in (r for r in rows if r["config"] == cfg.name):
            off = cfg.method == "none"
            by_pos = "/".join(f"{v:.2f}" for v in r["acceptance_by_pos"].values()) if r["acceptance_by_pos"] else "-"
            drafted = "-" if off or r["drafted_per_output_token"] is None else f"{r['drafted_per_output_token']:.2f}"
            lines.append(f"| {cfg.name} | {r['workload']} | {r['concurrency']} | {r['output_tok_s']:,.1f} | "
                         f"{_ratio(r['vs_off'])} | {r['p50_tpot_ms']:.1f} | {_ratio(r['tpot_vs_off'])} | "
                         f"{'-' if off else _acceptance(r)} | {by_pos} | {drafted} | "
                         f"{'-' if off else _pct(r['same_text_as_off'])} | {r['p50_ttft_ms']:,.0f} | "
                         f"{r['foreign_cpu_s'] / r['phase_s']:.2f} |")
    lines += ["", "out tok/s: output tokens / wall time of the measured run (grounded requests stop at EOS, so their "
              "output counts can differ a little between configs). vs off: over speculation off at the same workload "
              "and concurrency (TPOT vs off: below 1 is faster). acceptance: accepted / drafted tokens over the run "
              "(the server's /metrics delta; n/a: the server has no such metrics); by position: the same per "
              "draft position 0, 1, ... drafted / out tok: draft tokens verified per output token (0 where the "
              "engine switched speculation off, e.g. at batch sizes where verifying costs more than it saves). same "
              "text as off: share of requests whose output text equals off's (greedy). other load: CPU s/s other "
              "processes used during the run (0 = quiet)."]
    return "\n".join(lines)


def targets(rows: list[dict], servers: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, each met / NOT met / not measured (with the server's error where it failed)."""
    found = {(r["config"], r["workload"], r["concurrency"]): r["vs_off"] for r in rows}
    errors = {s["config"]: s["error"] for s in servers if "error" in s}
    out = []
    for name, workload, c, goal in TARGETS:
        got = found.get((name, workload, c))
        failed = next((f"{n} failed: {errors[n]}" for n in (name, "off") if n in errors), None)
        verdict = "met" if got is not None and got >= goal else "NOT met" if got is not None else "not measured"
        verdict += f" ({failed})" if got is None and failed else ""
        out.append({"config": name, "workload": workload, "concurrency": c, "target": goal, "measured": got,
                    "verdict": verdict})
    return out


def report(doc: dict[str, Any], configs: list[ServerConfig]) -> str:
    table = markdown(doc["servers"], doc["rows"], configs)
    target_lines = [f"- {t['config']} on {t['workload']} at c={t['concurrency']} >= {t['target']}x off tok/s: " +
                    (f"{t['measured']:.2f}x, {t['verdict']}" if t["measured"] is not None else t["verdict"])
                    for t in doc["targets"]]
    logged = [f"- {s['config']}: " + ("; ".join(s[k] for k in ("speculation", "draft", "dtype") if k in s)
                                      or "(nothing logged)") for s in doc["servers"]]
    bench = sorted({r["bench_command"] for r in doc["rows"]})
    return "\n".join([
        "## Speculative decoding (`benchmarks/llm/speculative.py`)", "",
        f"Machine: {quant.describe_machine(doc['machine'])}; {hardware.describe(doc['hardware'])}. Model: "
        f"{quant.GGUF.relative_to(llm.ROOT)} (auto dtype and quantization). Server threads: {doc['args']['threads']}; "
        f"up to {doc['args']['num_speculative_tokens']} speculative tokens. Figures from a shared box are noisy: "
        "compare rows of one run, not runs.", "",
        table, "", "Targets:", "", *target_lines, "", "What each server logged:", "", *logged, "", "Commands:", "",
        "```", f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/speculative.py {shlex.join(doc['argv'])}".rstrip(),
        *[s["command"] for s in doc["servers"]], *bench, "```", f"\nTotal {doc['seconds']:.0f} s.",
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, run in this order: off, ngram, draft "
                    "(draft needs --draft-model)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--num-prompts-factor", type=int, default=2,
                    help=f"measured requests = max({MIN_PROMPTS}, factor x c)")
    ap.add_argument("--threads", type=int, default=2, help="ladle --num-threads (and the hardware probe's)")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="ladle --max-num-seqs (at least the highest c): "
                    "the batch sizes speculation's start-up cost probe measures")
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="ladle --num-speculative-tokens")
    ap.add_argument("--draft-model", type=Path, default=None, help="the draft config's --speculative-model")
    ap.add_argument("--rounds", type=int, default=2, help="measurements per config and cell, interleaved; the best "
                    "is kept")
    args = ap.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown --workloads {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    clock = quant.Clock()
    llm.OUT.mkdir(parents=True, exist_ok=True)
    configs = select_configs(args)
    host = quant.machine()
    clock.say(quant.describe_machine(host))
    quant.gguf_config()  # saves the GGUF's tokenizer for the bench client once
    write_grounded()
    clock.say("measuring the hardware ...")
    hw = hardware.measure(args.threads)
    clock.say(hardware.describe(hw))
    servers, rows, texts = measure_all(configs, args, clock)
    annotate(rows, texts)
    doc = {"machine": host, "hardware": hw, "model": str(quant.GGUF.relative_to(llm.ROOT)), "servers": servers,
           "rows": rows, "targets": targets(rows, servers),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "argv": argv,
           "seconds": time.perf_counter() - clock.started}
    text = report(doc, configs)
    (llm.OUT / "speculative.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    (llm.OUT / "speculative.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
