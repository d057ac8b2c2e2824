"""Weight quantization vs full width, in one run: `ladle serve` output tok/s, TPOT/TTFT/ITL p50 and peak RSS at 1, 8
and 32 concurrent requests (128 in / 128 out, ignore_eos, `ladle bench serve`) for the random SmolLM-135M-shaped
checkpoint of run.py at the host's native full width (bfloat16 where the CPU has avx512_bf16/AMX, else float32),
at float32, `--quantization int8` and `int4`, and for the demo SmolLM2-135M-Instruct Q4_1 GGUF as it is (auto ->
int4) and with `--quantization int8`. Every row also gets the weight bytes one decode step reads and the batch-1
bandwidth roofline (copy bandwidth / those bytes); ratios are vs the native full-width row at the same concurrency.
Writes out/quant.md and out/quant.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/quant.py [--configs native,fp32,int8,int4,gguf,gguf-int8]
        [--concurrency 1,8,32] [--num-prompts-factor 2] [--threads 2] [--rounds 1]

Extra configs (not run by default): bf16 (bfloat16 full width, ladle's default on AVX2 hosts where its own GEMM runs
bf16), int8-dynamic, int8-weight-only (the two int8 kernels explicitly), gguf-none
(the GGUF dequantized to native full width: the fair baseline for the GGUF rows), native-f16kv and int8-f16kv (native
and int8 over a float16 KV cache, --kv-cache-dtype float16; int8's own default on a CPU computing in float32), and
int8-f32kv (int8 over an exact float32 cache).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run.py (this folder), hardware.py and spawn.py (benchmarks/)
import hardware  # noqa: E402
import run as llm  # noqa: E402  (benchmarks/llm/run.py: checkpoint, bench config, load accounting)
from spawn import Spawned, spawned_server, wait_compiled  # noqa: E402

from ladle.bench.serve import run as bench_run  # noqa: E402
from ladle.llm.dtypes import cpu_flags, cpu_has_native_bf16  # noqa: E402

GGUF = llm.ROOT / "examples/models/smollm2/1/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TOKENIZER = llm.OUT / "smollm2-135m-instruct-tokenizer"  # the GGUF's own tokenizer, saved for the bench client
DEFAULT_CONFIGS = "native,fp32,int8,int4,gguf,gguf-int8"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GROUP = 32  # ladle's default --quantization-group-size; the script keeps it (the log's value wins when present)
TARGETS = (("int8", 1, 1.6), ("int4", 1, 2.2), ("int8", 32, 1.3))  # (config, concurrency, min speed-up vs native)


@dataclass(frozen=True)
class ServerConfig:
    """One `ladle serve` configuration: a row group of the table."""

    name: str  # what --configs selects and the table shows
    model: str  # "random" (run.py's checkpoint) or "gguf" (the demo file)
    dtype: str
    quantization: str  # ladle's --quantization
    kv_cache_dtype: str = "auto"  # ladle's --kv-cache-dtype

    @property
    def model_path(self) -> Path:
        return GGUF if self.model == "gguf" else llm.MODEL_DIR

    @property
    def tokenizer(self) -> Path:
        return GGUF_TOKENIZER if self.model == "gguf" else self.model_path


def all_configs(native: str) -> dict[str, ServerConfig]:
    """Every selectable config; quantized rows compute in the native dtype, as the baseline does."""
    configs = [ServerConfig("native", "random", native, "none"), ServerConfig("fp32", "random", "float32", "none"),
               ServerConfig("bf16", "random", "bfloat16", "none")]
    configs += [ServerConfig(q, "random", native, q) for q in ("int8", "int8-dynamic", "int8-weight-only", "int4")]
    configs += [ServerConfig("gguf", "gguf", native, "auto"), ServerConfig("gguf-int8", "gguf", native, "int8"),
                ServerConfig("gguf-none", "gguf", native, "none")]
    # a float16 KV cache under the same weights: half the bytes each decode step's attention reads
    configs += [ServerConfig("native-f16kv", "random", native, "none", "float16"),
                ServerConfig("int8-f16kv", "random", native, "int8", "float16"),
                ServerConfig("int8-f32kv", "random", native, "int8", "float32")]
    return {c.name: c for c in configs}


def select_configs(names: str, native: str) -> list[ServerConfig]:
    known = all_configs(native)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(known)}")
    if native == "float32" and "fp32" in chosen and "native" in chosen:
        chosen.remove("fp32")  # the same server twice on a host without native bf16
        print("fp32 skipped: it is the native full width on this host", flush=True)
    return [known[n] for n in chosen]


# -- machine ------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = cpu_flags()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "flags": {f: f in flags for f in FLAGS}, "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
            "python": platform.python_version()}


def describe_machine(m: dict[str, Any]) -> str:
    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in m["flags"].items())
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); {flags}; torch {m['torch']}, "
            f"python {m['python']}")


def copy_bandwidth(threads: int) -> float:
    """hardware.py's copy bandwidth (read + write GB/s), the roofline's denominator as in run.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return hardware.copy_bandwidth_gbs()
    finally:
        torch.set_num_threads(before)


# -- checkpoints ---------------------------------------------------------------------------------------------------
def gguf_config() -> dict[str, Any]:
    """The GGUF's HF-style config; saves its tokenizer once for the bench client (BenchTokenizer reads only
    Hugging Face tokenizer directories, not GGUF files)."""
    from ladle.llm.models.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint.open(GGUF)
    if not (GGUF_TOKENIZER / "tokenizer.json").exists():
        print(f"saving the GGUF's tokenizer to {GGUF_TOKENIZER} ...", flush=True)
        checkpoint.tokenizer().save_pretrained(GGUF_TOKENIZER)
    return checkpoint.config


def model_config(cfg: ServerConfig) -> dict[str, Any]:
    return gguf_config() if cfg.model == "gguf" else orjson.loads((cfg.model_path / "config.json").read_bytes())


# -- weight bytes per decode step ----------------------------------------------------------------------------------
def layer_linears(config: dict[str, Any]) -> list[tuple[int, int]]:
    """[out, in] of one decoder layer's linears (q, k, v, o, gate, up, down); fusing them changes no byte count."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv, d = config.get("num_key_value_heads") or heads, config.get("head_dim") or h // heads
    return [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d), (inter, h), (inter, h), (h, inter)]


def linear_bytes(method: str, out_f: int, in_f: int, group: int) -> int:
    """What one forward reads, as ladle's kernels store it (quant.py's `nbytes`; no biases in Llama)."""
    if method in ITEMSIZE:
        return out_f * in_f * ITEMSIZE[method]
    if method == "int8-dynamic":
        return out_f * in_f + 8 * out_f  # float32 scale + zero point per output channel, in fbgemm's packing
    if method == "int8-weight-only":
        return out_f * in_f + 2 * out_f  # bfloat16 scale per output channel
    group = max((g for g in (32, 64, 128) if g <= group and in_f % g == 0), default=0)
    if method != "int4" or not group or out_f % 16:  # shapes int4 cannot take fall back to int8 (see quant.py)
        raise ValueError(f"no byte model for {method} on [{out_f}, {in_f}]")
    return out_f * in_f // 2 + out_f * (in_f // group) * 2 * 2  # 4-bit codes + bfloat16 scale and zero per group


def weight_bytes(config: dict[str, Any], body: str, head: str, group: int = 32) -> dict[str, int]:
    """Bytes of linear weights (+ scales) one decode step reads: every layer's linears, then the output head
    (vocab x hidden, the tied embedding's twin). Norms and the one embedding row per token are left out (<0.1%)."""
    per_layer = sum(linear_bytes(body, o, i, group) for o, i in layer_linears(config))
    body_bytes = per_layer * config["num_hidden_layers"]
    head_bytes = linear_bytes(head, config["vocab_size"], config["hidden_size"], group)
    return {"body": body_bytes, "head": head_bytes, "total": body_bytes + head_bytes}


def methods(cfg: ServerConfig, log: dict[str, Any]) -> tuple[str, str]:
    """(body, head) weight formats the server ended up with: full width, or what its log says it chose."""
    body = log.get("method") or ("none" if cfg.quantization in ("none", "auto") else cfg.quantization)
    if body == "int8":  # the log line naming the probe's pick is missing: assume fbgemm's, the usual winner
        body = "int8-dynamic"
    if body == "none":
        return cfg.dtype, cfg.dtype
    return body, "int8-weight-only" if body == "int4" else body  # ladle's head: int8, weight-only under int4


# -- the server ----------------------------------------------------------------------------------------------------
def server_command(cfg: ServerConfig, threads: int, max_num_seqs: int) -> list[str]:
    return [sys.executable, "-m", "ladle", "serve", "--model", str(cfg.model_path), "--served-model-name",
            llm.SERVED_NAME, "--dtype", cfg.dtype, "--quantization", cfg.quantization, "--num-threads", str(threads),
            "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", "2048", "--max-model-len", "512",
            "--kv-cache-memory", "512MiB", "--kv-cache-dtype", cfg.kv_cache_dtype, "--log-level", "info"]


def shown(command: list[str]) -> str:
    """The command as a person types it from the repository root."""
    words = [".venv/bin/ladle", *command[3:]] if command[1:3] == ["-m", "ladle"] else command
    return shlex.join(str(Path(w).relative_to(llm.ROOT)) if w.startswith(str(llm.ROOT)) else w for w in words)


def bench_command(cfg: ServerConfig, c: int, num_prompts: int, port: int = llm.PORT, seed: int | None = None) -> str:
    return shlex.join([
        ".venv/bin/ladle", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", llm.SERVED_NAME,
        "--tokenizer", str(cfg.tokenizer.relative_to(llm.ROOT)), "--dataset-name", "random", "--random-input-len",
        str(llm.INPUT_LEN), "--random-output-len", str(llm.OUTPUT_LEN), "--ignore-eos", "--max-concurrency", str(c),
        "--num-prompts", str(num_prompts), "--num-warmups", str(min(c, 8)), "--seed", str(c if seed is None else seed)])


LOG_PATTERNS = {
    "dtype": re.compile(r"dtype (\w+) \((.*)\)"),
    "int8": re.compile(r"quantization int8 -> ([\w-]+) \((.*)\)"),
    "int4": re.compile(r"quantization int4 \(group (\d+); ([\w-]+) where int4 does not fit; (.*)\)"),
    "auto_int8": re.compile(r"quantization auto: int8 instead of int4 for this Q4 GGUF \((.*)\)"),
    "packed": re.compile(r"packed (\d+) quantized layers \((.*?); (\d+) rows repacked.*?\), ([\d.]+) MB"),
    "probe": re.compile(r"quantization probe \((.*)\)"),
}


def parse_log(text: str) -> dict[str, Any]:
    """What the server logged about its numeric format: dtype, the int8 kernel the probe chose, int4's group,
    the packed layer count and bytes."""
    found = {k: p.search(text) for k, p in LOG_PATTERNS.items()}
    out: dict[str, Any] = {k: m.group(0) for k, m in found.items() if m}
    if found["int4"]:
        out["method"], out["group"] = "int4", int(found["int4"].group(1))
    elif found["int8"]:
        out["method"] = found["int8"].group(1)
    if found["packed"]:
        out["packed_layers"], out["packed_mb"] = found["packed"].group(2), float(found["packed"].group(4))
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS, the load included) and VmRSS of a live process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS") if k in fields}


def measure_once(cfg: ServerConfig, c: int, factor: int, server_pid: int, port: int = llm.PORT,
                 round_: int = 0) -> dict[str, Any]:
    """One `ladle bench serve` run. Each round draws prompts of its own (seed c + 1000 x round): a round that
    repeated the last one's prompts would find their prefixes cached."""
    config = dataclasses.replace(llm.bench_config(port, c, cfg.tokenizer, warmups=min(c, 8)),
                                 num_prompts=max(4, factor * c), seed=c + 1000 * round_)
    with llm.foreign_cpu([os.getpid(), server_pid]) as other:
        result = bench_run(config)
    s = result.summary
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed: {next(r.error for r in result.records if r.error)}")
    (llm.OUT / f"quant-{cfg.name}-c{c}.json").write_bytes(result.to_json())
    return {"config": cfg.name, "concurrency": c, "requests": s["completed"], "seconds": s["duration"],
            "input_tokens": s["total_input_tokens"], "output_tokens": s["total_output_tokens"],
            "output_tok_s": s["output_throughput"], **other, **{k: v for k, v in s.items() if k.endswith("_ms")},
            "bench_command": bench_command(cfg, c, config.num_prompts, port, config.seed)}


def start_server(cfg: ServerConfig, args: argparse.Namespace, clock: Clock, stack: contextlib.ExitStack,
                 port: int) -> tuple[dict[str, Any], Spawned | None]:
    """Start one config's server inside `stack` and wait for its compiled decoder. A server that refuses to start
    (e.g. int4 slower than int8 on this host) gives a record with `error` and no process."""
    command = server_command(cfg, args.threads, args.max_num_seqs)
    log_path = llm.OUT / f"quant-server-{cfg.name}.log"
    log_path.write_bytes(b"")
    server: dict[str, Any] = {"config": cfg.name, "command": shown(command), "log": str(log_path.relative_to(llm.ROOT))}
    clock.say(f"{cfg.name}: starting `{server['command']}`")
    try:
        spawned = stack.enter_context(spawned_server(command, log_path, port=port, timeout_s=300, poll_s=0.2))
    except RuntimeError:  # the reason is in its log
        server["error"] = last_error(log_path)
        clock.say(f"{cfg.name}: FAILED ({server['error']})")
        return server, None
    server["ready_s"] = spawned.ready_s
    clock.say(f"{cfg.name}: ready in {spawned.ready_s:.1f} s")
    server["compiled_after_s"] = compiled = wait_compiled(port, llm.SERVED_NAME)
    clock.say(f"{cfg.name}: " + (f"decoder compiled {compiled:.1f} s after ready" if compiled is not None
                                 else "decoder not compiled after 300 s: measuring eager steps"))
    return server, spawned


def finish_server(server: dict[str, Any], spawned: Spawned | None) -> None:
    """Peak RSS (VmHWM is gone with the process: read before it stops) and what the log says it chose."""
    if spawned is not None and spawned.process.poll() is None:
        server["memory_kb"] = memory_kb(spawned.process.pid)
    server.update(parse_log((llm.ROOT / server["log"]).read_text(errors="replace")))


def measure_server(cfg: ServerConfig, args: argparse.Namespace, clock: Clock) -> tuple[dict[str, Any], list[dict]]:
    """One server's life: start it, run every concurrency, read its peak RSS, stop it."""
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        server, spawned = start_server(cfg, args, clock, stack, llm.PORT)
        if spawned is None:
            return server, rows
        try:
            for c in args.concurrencies:
                clock.say(f"{cfg.name}: concurrency {c}, {max(4, args.num_prompts_factor * c)} requests ...")
                rows.append(measure_once(cfg, c, args.num_prompts_factor, spawned.process.pid))
                clock.say(f"{cfg.name}: c={c} {rows[-1]['output_tok_s']:.1f} tok/s")
        except RuntimeError as e:  # failed requests; later configs go on
            server["error"] = str(e)[:400]
            clock.say(f"{cfg.name}: FAILED ({server['error']})")
        finally:
            finish_server(server, spawned)
    return server, rows


def measure_alternating(configs: list[ServerConfig], args: argparse.Namespace,
                        clock: Clock) -> tuple[list[dict], list[dict], list[dict]]:
    """--rounds N: every config's server up at once (one port each), each cell (concurrency x config) measured in
    turn, N rounds: (servers, every round's rows). On a host that drifts by 10-30% within minutes, only cells measured
    side by side give a ratio (a sequential pair of runs here measured int8 / float32 at 0.84x in one order and 1.13x
    in the other). The order within a round reverses every other round (ABBA): measured in a fixed order, whichever
    config ran first in each round came out ~5% ahead (a float16-KV server 0.85-0.99x float32's when listed third,
    1.01-1.07x when listed first)."""
    all_rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        started = [start_server(cfg, args, clock, stack, llm.PORT + i) for i, cfg in enumerate(configs)]
        servers = [server for server, _ in started]
        try:
            for round_ in range(args.rounds):
                for c in args.concurrencies:
                    for i in round_order(len(configs), round_):
                        cfg, (server, spawned) = configs[i], started[i]
                        if spawned is None or "error" in server:
                            continue
                        try:
                            row = measure_once(cfg, c, args.num_prompts_factor, spawned.process.pid, llm.PORT + i,
                                               round_)
                        except RuntimeError as e:
                            server["error"] = str(e)[:400]
                            continue
                        all_rows.append({**row, "round": round_})
                        clock.say(f"round {round_ + 1}/{args.rounds}: {cfg.name} c={c} {row['output_tok_s']:.1f} tok/s")
        finally:
            for server, spawned in started:
                finish_server(server, spawned)
    return servers, all_rows


def round_order(n: int, round_: int) -> list[int]:
    """The order of n alternated servers in a round: forward in even rounds, reversed in odd ones (ABBA), so that no
    server always runs first, or always right after another."""
    order = list(range(n))
    return order if round_ % 2 == 0 else order[::-1]


def best_rounds(rows: list[dict], *cell: str) -> dict[tuple, dict]:
    """Each cell's (the values of the `cell` fields) row with the most output tok/s."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[field] for field in cell)
        if key not in best or row["output_tok_s"] > best[key]["output_tok_s"]:
            best[key] = row
    return best


def _cells(all_rows: list[dict]) -> tuple[list[tuple[str, int]], dict[tuple[str, int], list[float | None]]]:
    """The (config, concurrency) cells in report order, and each cell's tok/s round by round (None: not measured)."""
    cells = sorted({(r["config"], r["concurrency"]) for r in all_rows}, key=lambda cell: (cell[1], cell[0]))
    of = {(r["config"], r["concurrency"], r["round"]): r["output_tok_s"] for r in all_rows}
    rounds = sorted({r["round"] for r in all_rows})
    return cells, {(name, c): [of.get((name, c, n)) for n in rounds] for name, c in cells}


def round_ratios(all_rows: list[dict]) -> dict[tuple[str, int], list[float]]:
    """Each non-native cell's ratio to native, round by round, where both were measured in every round."""
    cells, figures = _cells(all_rows)
    out = {}
    for name, c in cells:
        native, own = figures.get(("native", c), []), figures[(name, c)]
        if name != "native" and native and all(native) and all(own):
            out[(name, c)] = [f / b for f, b in zip(own, native, strict=True)]
    return out


def round_lines(all_rows: list[dict]) -> list[str]:
    """Every round's tok/s per cell, and the cell's ratio to native round by round."""
    cells, figures = _cells(all_rows)
    ratios = round_ratios(all_rows)
    out = []
    for cell in cells:
        name, c = cell
        line = f"{name} c={c}: " + " ; ".join("-" if f is None else f"{f:.1f}" for f in figures[cell]) + " tok/s"
        if cell in ratios:
            line += " (vs native, round by round: " + ", ".join(f"{r:.2f}x" for r in ratios[cell]) + ")"
        out.append(line)
    return out


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|Error|refused", line)]
    return (errors or lines or ["(empty log)"])[-1][:400]


class Clock:
    """One progress line per phase, with the time since the run began."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {text}", file=sys.stderr, flush=True)


# -- report --------------------------------------------------------------------------------------------------------
def annotate(servers: list[dict], rows: list[dict], configs: list[ServerConfig], bandwidth_gbs: float) -> None:
    """Weight bytes per step, roofline, peak RSS and the ratio vs native full width, onto every row."""
    by_name = {c.name: c for c in configs}
    for server in servers:
        cfg = by_name[server["config"]]
        body, head = methods(cfg, server)
        wb = weight_bytes(model_config(cfg), body, head, server.get("group", GROUP))
        server.update(body_format=body, head_format=head, weight_bytes=wb,
                      roofline_c1_tok_s=bandwidth_gbs * 1e9 / wb["total"])
        if "packed_mb" in server and abs(server["packed_mb"] * 1e6 / wb["body"] - 1) > 0.02:
            print(f"note: {cfg.name}: the log's packed {server['packed_mb']:.1f} MB differs from the byte model's "
                  f"{wb['body'] / 1e6:.1f} MB for the linears", file=sys.stderr)
    base = {r["concurrency"]: r["output_tok_s"] for r in rows if r["config"] == "native"}
    info = {s["config"]: s for s in servers}
    for r in rows:
        s = info[r["config"]]
        r.update(weight_mb=s["weight_bytes"]["total"] / 1e6, roofline_c1_tok_s=s["roofline_c1_tok_s"],
                 peak_rss_mb=s["memory_kb"]["VmHWM"] / 1024 if "VmHWM" in s.get("memory_kb", {}) else None,
                 vs_native=r["output_tok_s"] / base[r["concurrency"]] if r["concurrency"] in base else None)


def label(cfg: ServerConfig, server: dict[str, Any]) -> str:
    """e.g. "int8: random SmolLM-135M, int8-dynamic (bfloat16 compute)": config, model, weight format."""
    fmt = server.get("body_format", cfg.dtype if cfg.quantization in ("none", "auto") else cfg.quantization)
    fmt += f" g{server['group']}" if fmt == "int4" and "group" in server else ""
    what = "SmolLM2 Q4_1 GGUF" if cfg.model == "gguf" else "random SmolLM-135M"
    return f"{cfg.name}: {what}, {fmt}" + (f" ({cfg.dtype} compute)" if fmt != cfg.dtype else "")


def markdown(servers: list[dict], rows: list[dict], configs: list[ServerConfig], native: str) -> str:
    info = {s["config"]: s for s in servers}
    lines = ["| config | c | out tok/s | vs native | TPOT p50 ms | TTFT p50 ms | ITL p50 ms | weight MB/step | "
             "roofline c=1 tok/s | peak RSS MB | other load |", "|---|" + "---:|" * 10]
    for cfg in configs:
        s = info[cfg.name]
        if "error" in s:
            lines.append(f"| {label(cfg, s)} | - | failed: {s['error'][:160]} | | | | | | | | |")
        for r in (r for r in rows if r["config"] == cfg.name):
            vs = f"{r['vs_native']:.2f}x" if r["vs_native"] is not None else "-"
            lines.append(f"| {label(cfg, s)} | {r['concurrency']} | {r['output_tok_s']:,.1f} | {vs} | "
                         f"{r['p50_tpot_ms']:.1f} | {r['p50_ttft_ms']:,.0f} | {r['p50_itl_ms']:.1f} | "
                         f"{r['weight_mb']:.0f} | {r['roofline_c1_tok_s']:.0f} | {_mb(r['peak_rss_mb'])} | "
                         f"{r['foreign_cpu_s'] / r['phase_s']:.2f} |")
    lines += ["", f"vs native: output tok/s over the native full-width row ({native}, random checkpoint) at the same "
              "concurrency; the GGUF rows are another model (vocab 49152 vs 32000: a 1.5x bigger head), so their "
              "ratios are only indicative (run gguf-none for their own full-width baseline). roofline: copy "
              "bandwidth / weight bytes per step (KV-cache reads left out). other load: CPU s/s other processes "
              "used during the phase (0 = quiet)."]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def ratio_lines(rows: list[dict]) -> list[str]:
    return [f"{r['config']} c={r['concurrency']}: {r['vs_native']:.2f}x" for r in rows
            if r["vs_native"] is not None and r["config"] != "native"]


def targets(rows: list[dict], servers: list[dict], all_rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, each met / NOT met / not measured (with the server's error where it failed). With
    --rounds, judged by the median of the round-by-round ratios (each round's cells run side by side), else by the
    one run's ratio."""
    found = {(r["config"], r["concurrency"]): r["vs_native"] for r in rows}
    found |= {cell: statistics.median(ratios) for cell, ratios in round_ratios(all_rows).items()}
    errors = {s["config"]: s["error"] for s in servers if "error" in s}
    out = []
    for name, c, goal in TARGETS:
        got = found.get((name, c))
        failed = next((f"{n} failed: {errors[n]}" for n in (name, "native") if n in errors), None)
        verdict = "met" if got is not None and got >= goal else "NOT met" if got is not None else "not measured"
        verdict += f" ({failed})" if got is None and failed else ""
        out.append({"config": name, "concurrency": c, "target": goal, "measured": got, "verdict": verdict})
    return out


def report(doc: dict[str, Any], configs: list[ServerConfig]) -> str:
    table = markdown(doc["servers"], doc["rows"], configs, doc["native_dtype"])
    target_lines = [f"- {t['config']} c={t['concurrency']} >= {t['target']}x vs native: " +
                    (f"{t['measured']:.2f}x, {t['verdict']}" if t["measured"] is not None else t["verdict"])
                    for t in doc["targets"]]
    logged = ("dtype", "int8", "int4", "auto_int8", "packed")
    kernels = [f"- {s['config']}: " + ("; ".join(s[k] for k in logged if k in s) or "(nothing logged)")
               for s in doc["servers"]]
    commands = [f"{s['command']}" for s in doc["servers"]]
    bench = sorted({r["bench_command"] for r in doc["rows"]})
    return "\n".join([
        "## LLM weight quantization (`benchmarks/llm/quant.py`)", "",
        f"Machine: {describe_machine(doc['machine'])}; copy bandwidth {doc['bandwidth_gbs']:.1f} GB/s (read + write)."
        f" Native full width: {doc['native_dtype']}. Server threads: {doc['args']['threads']}.", "",
        table, "", "Ratios vs native full width (same run, same concurrency):", "",
        *[f"- {line}" for line in ratio_lines(doc["rows"])], "",
        *(["Every round (servers up at once, cells alternating; the table keeps each cell's better round):", "",
           *[f"- {line}" for line in round_lines(doc["rounds"])], ""] if doc["rounds"] else []),
        "Targets" + (" (the median of the rounds' ratios):" if doc["rounds"] else ":"), "", *target_lines, "",
        "What each server chose (its log):", "", *kernels, "", "Commands:", "", "```",
        f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/quant.py {shlex.join(doc['argv'])}".rstrip(),
        *commands, *bench, "```", f"\nTotal {doc['seconds']:.0f} s.",
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, run in this order; also: "
                    "int8-dynamic, int8-weight-only, gguf-none")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num-prompts-factor", type=int, default=2, help="measured requests = max(4, factor x c)")
    ap.add_argument("--threads", type=int, default=2, help="ladle --num-threads (and the bandwidth probe's)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="above 1: all servers up at once, cells alternating "
                    "(the only way to a ratio on a drifting host), the better round per cell reported")
    args = ap.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    clock = Clock()
    llm.OUT.mkdir(parents=True, exist_ok=True)
    native = "bfloat16" if cpu_has_native_bf16() else "float32"
    configs = select_configs(args.configs, native)
    host = machine()
    clock.say(describe_machine(host))
    llm.ensure_checkpoint()
    if any(c.model == "gguf" for c in configs):
        gguf_config()
    clock.say("measuring copy bandwidth ...")
    bandwidth = copy_bandwidth(args.threads)
    clock.say(f"copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    servers, rows, all_rows = [], [], []
    if args.rounds > 1:
        servers, all_rows = measure_alternating(configs, args, clock)
        rows = list(best_rounds(all_rows, "config", "concurrency").values())
    else:
        for cfg in configs:
            server, measured = measure_server(cfg, args, clock)
            servers.append(server)
            rows += measured
    annotate(servers, rows, configs, bandwidth)
    doc = {"machine": host, "native_dtype": native, "bandwidth_gbs": bandwidth, "servers": servers, "rows": rows,
           "targets": targets(rows, servers, all_rows), "args": {k: v for k, v in vars(args).items()}, "argv": argv,
           "rounds": all_rows,
           "seconds": time.perf_counter() - clock.started}
    text = report(doc, configs)
    (llm.OUT / "quant.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (llm.OUT / "quant.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
