"""Scaling out on Ray (issue 12): one ladle against `ladle serve --ray` with 1 and 2 replicas of one core each on a
local two-node Ray cluster, and the two ways to put ladle on Ray against each other.

- Servers: direct = one `ladle serve examples/models` (no Ray; iris, minilm and smollm2 loaded); (A) = `ladle serve
  examples/models --ray 127.0.0.1:P --replicas R --num-cpus 1 --load-model M`, one model per front end (two nodes of
  one CPU each hold two one-core replicas in all), R = 1 and 2; (B) = ladle's ASGI app as the ingress of a Serve
  deployment behind Serve's own HTTP proxy (ingress.py), one replica of one core.
- iris (ONNX, version 2): the README's KServe v2 body; `ladle bench infer` sequential (c=1: p50 and p99, the routing
  overhead is p50 of (A) with 1 replica minus p50 direct) and closed loop at --concurrency (req/s, p99).
- minilm: one-text /v1/embeddings requests, closed loop at --concurrency (req/s, p99).
- smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF): `ladle bench serve` /v1/completions, random 128-token prompts,
  max_tokens 64, ignore_eos, closed loop at --concurrency (output tok/s), sized to last about --llm-duration s.
- Prefix hits: prefix_workload.py's shared-prefix prompts on 2 replicas, `--llm-routing prefix` vs `power-of-two`,
  on fresh replicas; two sizes: `fits` (--prefix-groups heads, all of which fit in one replica's KV cache) and
  `pressure` (as many heads as --pressure times one replica's KV cache holds: two replicas' caches hold them only
  if each keeps its own half). Hit rate from the responses' usage and from the replicas' counters.
- Where (A)'s time goes (floor.py): a no-op Serve deployment called through a handle (ladle's Serve settings and
  Serve's defaults), the same with LadleRouter, and ladle's iris replica called through ladle's Cluster, no HTTP.
- Each phase records the CPU time other processes took meanwhile (other load, CPU s/s: 2 cores in all) and the CPU
  each role of this run spent per request (server or front end, replicas, Serve proxy, the rest of Ray, client).
- (A)'s Serve applications are `bench-<model>` (--ray-app-prefix): tests elsewhere look for `ladle-<model>` replica
  processes machine-wide.

The cluster: ray.cluster_utils.Cluster in a helper process (local_cluster.py), private temp dir, stopped at the end
whatever happens. Writes out/ray_scaling.md and out/ray_scaling.json (--name) and prints the tables.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cluster/ray_scaling.py [--quick] [--duration 15]
        [--seq-duration 10] [--llm-duration 20] [--concurrency 8] [--models iris,minilm,smollm2]
        [--prefix-groups 8] [--prefix-rounds 6] [--pressure 1.5] [--pressure-rounds 3] [--floor noop,...]
        [--parts direct,ray,prefix,floor,ingress] [--name ray_scaling] [--report-only]

Full: about 10.5 minutes on the 2-core dev box. --quick: iris and smollm2 only, short phases, no `pressure` workload,
two floor variants (a smoke run, about 3-4 minutes, most of it server start-ups).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path[:0] = [str(HERE), str(BENCH), str(BENCH / "llm"), str(BENCH / "jobs")]
import hardware  # noqa: E402
import prefix_workload as pw  # noqa: E402
import quant  # noqa: E402  (benchmarks/llm/quant.py: machine info, the GGUF and its tokenizer, progress clock)
import report  # noqa: E402
import run as llm  # noqa: E402  (benchmarks/llm/run.py: ROOT, other-load accounting)
import workload  # noqa: E402  (benchmarks/jobs/workload.py: the texts to embed, the questions)
from batch_client import embeddings_load  # noqa: E402
from local_cluster import local_cluster  # noqa: E402
from spawn import Spawned, free_port, spawned_server  # noqa: E402

from ladle.bench import InferBenchConfig  # noqa: E402
from ladle.bench.infer import run as infer_run  # noqa: E402
from ladle.bench.serve import ServeBenchConfig  # noqa: E402
from ladle.bench.serve import run as serve_run  # noqa: E402

ROOT = llm.ROOT
OUT = HERE / "out"
REPO = ROOT / "examples" / "models"
IRIS, EMBEDDER, LLM = "iris", "minilm", "smollm2"
IRIS_BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
LLM_IN, LLM_OUT = 128, 64
APP_PREFIX = "bench-"
PREFIX_MAX_TOKENS, PREFIX_CONCURRENCY = 4, 4
FULL = dict(duration=15.0, seq_duration=10.0, llm_duration=20.0, prefix_rounds=6, pressure_rounds=3, pressure=1.5,
            floor_calls=1000, models="iris,minilm,smollm2", floor="noop,noop-defaults,noop-ladle-router,ladle-iris")
QUICK = dict(duration=3.0, seq_duration=2.0, llm_duration=5.0, prefix_rounds=3, pressure_rounds=2, pressure=0.0,
             floor_calls=300, models="iris,smollm2", floor="noop,ladle-iris")
PARTS = ("direct", "ray", "prefix", "floor", "ingress")


# -- servers -----------------------------------------------------------------------------------------------------------
def ladle_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "ladle", "serve", str(REPO), "--log-level", "info", *extra]


def ray_command(address: str, replicas: int, model: str, *extra: str) -> list[str]:
    """APP_PREFIX: this run's Serve applications are its own (not `ladle-<model>`, which other sessions' tests look
    for by process title, machine-wide)."""
    return ladle_command("--ray", address, "--ray-app-prefix", APP_PREFIX, "--replicas", str(replicas), "--num-cpus",
                         "1", "--load-model", model, *extra)


def shown(command: list[str]) -> str:
    return quant.shown(command) + " --port PORT"


@contextlib.contextmanager
def server(command: list[str], log: Path, clock: quant.Clock, model: str | None = None,
           replicas: int = 0) -> Any:
    """A server until the block ends; with `replicas`, also waits until the front end's /metrics shows that many
    replicas of `model` running and answering (ready means one replica, not all)."""
    clock.say(f"starting `{shown(command)}` ...")
    with spawned_server(command, log, port=free_port(), timeout_s=600, poll_s=0.2) as spawned:
        ready_s = spawned.ready_s
        if replicas:
            ready_s = wait_replicas(spawned, model, replicas)
        clock.say(f"ready in {spawned.ready_s:.1f} s" + (f", {replicas} replica(s) in {ready_s:.1f} s" if replicas
                                                          else ""))
        yield spawned, ready_s


def wait_replicas(spawned: Spawned, model: str, count: int, timeout_s: float = 300.0) -> float:
    """Seconds from spawn until the front end's ladle_cluster_replicas gauge shows `count` running replicas."""
    started = time.perf_counter() - spawned.ready_s
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if pw.replicas(pw.scrape(spawned.url), model) >= count:
            return time.perf_counter() - started
        if spawned.process.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"{model}: {count} replicas did not come up (see the server log)")


def kv_capacity_tokens(log: Path) -> int | None:
    """One smollm2 replica's KV cache in tokens, from the direct server's log line `N KV blocks of B tokens`."""
    found = re.findall(r"(\d+) KV blocks of (\d+) tokens", log.read_text(errors="replace"))
    return int(found[-1][0]) * int(found[-1][1]) if found else None


# -- loads -------------------------------------------------------------------------------------------------------------
def measured(work: Any, server_pid: int | None = None) -> dict[str, Any]:
    """work() with the other load of the box over it (CPU s/s of processes outside this run's tree), and the CPU time
    each role of this run's processes spent per request: the server process (ladle, or (A)'s front end), Serve
    replicas, Serve's HTTP proxy, the rest of Ray (raylets, GCS, controller), and this load-generating client."""
    with foreign_cpu(server_pid) as other:
        row = work()
    row["other_load"] = other["foreign_cpu_s"] / other["phase_s"]
    row["cpu_ms_per_request"] = {role: s / row["requests"] * 1e3 for role, s in other["roles"].items()}
    return row


@contextlib.contextmanager
def foreign_cpu(server_pid: int | None = None) -> Any:
    """llm.foreign_cpu over every process this run started (servers, the Ray nodes and their workers), by role."""
    before = _cpu_by_pid()
    box, started = llm._box_busy_s(), time.perf_counter()
    out: dict[str, Any] = {}
    yield out
    after = _cpu_by_pid()
    box_s = llm._box_busy_s() - box
    server = _tree(server_pid) if server_pid else set()  # the server and its helper processes
    roles: dict[str, float] = {}
    for pid, (cpu, cmd) in after.items():
        role = _role(pid, cmd, server)
        roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (0.0, b""))[0]
    out["foreign_cpu_s"] = max(0.0, box_s - sum(roles.values()))
    out["roles"] = roles
    out["phase_s"] = time.perf_counter() - started


def _cpu_by_pid() -> dict[int, tuple[float, bytes]]:
    out = {}
    for pid in _tree(os.getpid()):
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = (llm._cpu_s(pid), Path(f"/proc/{pid}/cmdline").read_bytes()[:200])
    return out


def _role(pid: int, cmd: bytes, server: set[int]) -> str:
    if pid == os.getpid():
        return "client"
    if pid in server:
        return "server"
    if b"ServeReplica" in cmd:
        return "replicas"
    return "proxy" if b"ProxyActor" in cmd else "ray"


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    seen, stack = set(), [root]
    while stack:
        pid = stack.pop()
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def iris_load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    config = InferBenchConfig(url=url, model=IRIS, input=OUT / "iris-request.json", concurrency=concurrency,
                              duration=seconds, warmup=max(50, 4 * concurrency), progress=False)
    result = infer_run(config)
    s = result.summary()
    if s["errors"]:
        raise RuntimeError(f"iris: errors {s['errors']}: {result.error_samples}")
    lat = s["latency_ms"]
    return {"model": IRIS, "concurrency": concurrency, "requests": s["successes"], "seconds": s["duration_s"],
            "req_s": s["throughput_rps"], "p50_ms": lat["p50"], "p99_ms": lat["p99"]}


def minilm_load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    bodies = [workload.embedding_body(EMBEDDER, t) for t in workload.prompts()]
    row = embeddings_load(url, bodies, concurrency, seconds)
    if row["failed"]:
        raise RuntimeError(f"minilm: {row['failed']} requests failed")
    return {"model": EMBEDDER, **row}


def llm_config(url: str, n: int, concurrency: int, seed: int) -> ServeBenchConfig:
    return ServeBenchConfig(base_url=url, endpoint="/v1/completions", model=LLM, tokenizer=quant.GGUF_TOKENIZER,
                            dataset_name="random", random_input_len=LLM_IN, random_output_len=LLM_OUT,
                            num_prompts=n, max_concurrency=concurrency, ignore_eos=True, temperature=0.0, seed=seed,
                            metric_percentiles="50,99", disable_tqdm=True)


def llm_load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """A warm-up wave of `concurrency` requests sizes the measured closed loop to about `seconds`."""
    started = time.perf_counter()
    serve_run(llm_config(url, concurrency, concurrency, seed=1000))
    n = max(2 * concurrency, round(concurrency / (time.perf_counter() - started) * seconds))
    result = serve_run(llm_config(url, n, concurrency, seed=1))
    s = result.summary
    if s["failed"]:
        error = next(r.error for r in result.records if r.error)
        raise RuntimeError(f"smollm2: {s['failed']} requests failed: {error}")
    return {"model": LLM, "concurrency": concurrency, "requests": s["completed"], "seconds": s["duration"],
            "req_s": s["request_throughput"], "output_tok_s": s["output_throughput"],
            "p50_ttft_ms": s["p50_ttft_ms"], "p99_ttft_ms": s["p99_ttft_ms"], "p50_tpot_ms": s["p50_tpot_ms"],
            "p99_ms": s["p99_e2el_ms"]}


def measure_model(url: str, model: str, args: argparse.Namespace, clock: quant.Clock, label: str,
                  server_pid: int) -> list[dict]:
    c = args.concurrency
    if model == IRIS:
        loads = [(f"iris sequential, {args.seq_duration:.0f} s", lambda: iris_load(url, 1, args.seq_duration)),
                 (f"iris at concurrency {c}, {args.duration:.0f} s", lambda: iris_load(url, c, args.duration))]
    elif model == EMBEDDER:
        loads = [(f"minilm /v1/embeddings at concurrency {c}, {args.duration:.0f} s",
                  lambda: minilm_load(url, c, args.duration))]
    else:
        loads = [(f"smollm2 /v1/completions at concurrency {c}, ~{args.llm_duration:.0f} s",
                  lambda: llm_load(url, c, args.llm_duration))]
    counter = "ladle_llm_requests_total" if model == LLM else "ladle_model_requests_total"
    rows = []
    for what, load in loads:
        clock.say(f"{label}: {what} ...")
        before = pw.scrape(url)
        row = measured(load, server_pid)
        split = pw.delta_by_replica(before, pw.scrape(url), counter, model)  # how the requests spread
        row.update(server=label, per_replica_requests={k: v for k, v in split.items() if "#" in k} or None)
        clock.say(f"{label}: {report.one_line(row)}")
        rows.append(row)
    return rows


FLOOR_VARIANTS = {"noop": [], "noop-defaults": ["--serve-defaults"],
                  "noop-ladle-router": ["--target", "noop-ladle-router"], "ladle-iris": ["--target", "ladle-iris"]}


def floor(address: str, clock: quant.Clock, args: argparse.Namespace) -> list[dict[str, Any]]:
    """floor.py's ladder: Serve's own per-call floor (ladle's Serve settings and Serve's defaults), with ladle's router,
    and ladle's iris replica called through ladle's Cluster without the front end's HTTP."""
    out = []
    for extra in (FLOOR_VARIANTS[v] for v in args.floor):
        command = [sys.executable, str(HERE / "floor.py"), "--address", address, "--concurrency",
                   str(args.concurrency), "--seconds", str(args.duration), "--calls", str(args.floor_calls), *extra]
        clock.say(f"Ray floor: `{quant.shown(command)}` ...")
        with (OUT / f"{args.name}-floor.log").open("ab") as log:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, timeout=300)
        lines = [x for x in done.stdout.decode().splitlines() if x.startswith("{")]
        if done.returncode or not lines:
            clock.say(f"floor.py {' '.join(extra)} failed (exit {done.returncode}); see out/{args.name}-floor.log")
            continue
        row = {**orjson.loads(lines[-1]), "command": quant.shown(command)}
        clock.say(f"Ray floor ({row['target']}, {row['settings']}): sequential p50 {row['p50_ms']:.2f} ms, p99 "
                  f"{row['p99_ms']:.2f} ms; {row['calls_s']:,.0f} calls/s at c={row['concurrency']}")
        out.append(row)
    return out


NOISE = ("Failed to look up actor", "actor_died_error", "ACTOR_DIED", "Bound asyncio event loop is not running",
         "KillActor RPC failed", "cancelling task of dead actor", "grpc_server.")


def ray_errors(tmp: str, path: Path) -> int:
    """Lines of the Ray session's logs (replicas, controller, raylets, drivers) that report an error, less the notices
    every app deletion and Serve shutdown leaves (NOISE); kept in `path`."""
    found = []
    for log in sorted(Path(tmp).glob("ray/session_2*/logs/**/*")):  # session_2…: not the session_latest link
        if log.is_file() and log.suffix in (".err", ".log", ".out"):
            for line in log.read_text(errors="replace").splitlines():
                if re.search(r"Traceback|\bERROR\b|\w+Error\b|SIGSEGV|exited unexpectedly|\bdied\b", line) and \
                        not any(n in line for n in NOISE):
                    found.append(f"{log.relative_to(tmp)}: {line[:600]}")
    path.write_text("\n".join(found) + ("\n" if found else ""))
    return len(found)


def prefix_runs(url: str, routing: str, args: argparse.Namespace, doc: dict[str, Any],
                clock: quant.Clock) -> list[dict[str, Any]]:
    """The `fits` workload, then `pressure` (its groups numbered after the first's, so no head is shared)."""
    out = []
    sizes = [("fits", args.prefix_groups, args.prefix_rounds, 0)]
    if args.pressure > 0:
        sizes.append(("pressure", None, args.pressure_rounds, 1000))
    for scenario, groups, rounds, offset in sizes:
        if groups is None:  # as many heads as `pressure` x one replica's cache, from the first run's head size
            groups = doc.setdefault("pressure_groups", pressure_groups(doc, args))
        items = [(g, p) for g, p in pw.prompts(groups + offset, rounds, workload.QUESTIONS, args.head_chars)
                 if g >= offset]
        clock.say(f"prefix ({routing}), {scenario}: {groups} groups x {rounds} rounds = {len(items)} requests ...")
        row = measured(lambda items=items: pw.run(url, LLM, items, PREFIX_CONCURRENCY, PREFIX_MAX_TOKENS))
        row.update(routing=routing, scenario=scenario, groups=groups, rounds=rounds, concurrency=PREFIX_CONCURRENCY)
        doc.setdefault("head_tokens", row["mean_prompt_tokens"])
        clock.say(f"prefix ({routing}), {scenario}: hit rate {row['hit_rate_usage']:.1%} (usage), "
                  f"{row['hit_rate_metrics']:.1%} (counters) in {row['seconds']:.1f} s; prompt tokens per replica "
                  f"{ {k.split('#')[-1]: int(v) for k, v in row['prompt_tokens_per_replica'].items()} }; "
                  f"other load {row['other_load']:.2f}")
        out.append(row)
    return out


def pressure_groups(doc: dict[str, Any], args: argparse.Namespace) -> int:
    capacity = doc.get("kv_capacity_tokens") or 11_000
    return max(args.prefix_groups + 1, math.ceil(args.pressure * capacity / doc["head_tokens"]))


# -- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: short phases, fewer prefix rounds")
    ap.add_argument("--duration", type=float, help="seconds of each closed-loop run (default 15; --quick 4)")
    ap.add_argument("--seq-duration", type=float, help="seconds of each sequential iris run (default 10; --quick 3)")
    ap.add_argument("--llm-duration", type=float, help="seconds each smollm2 run should last (default 20; --quick 6)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop concurrency of the throughput runs")
    ap.add_argument("--prefix-groups", type=int, default=8, help="groups of the `fits` prefix workload")
    ap.add_argument("--prefix-rounds", type=int, help="requests per group, `fits` (default 6; --quick 3)")
    ap.add_argument("--pressure-rounds", type=int, help="requests per group, `pressure` (default 3; --quick 2)")
    ap.add_argument("--floor-calls", type=int, help="sequential handle calls of the Ray floor (default 1000)")
    ap.add_argument("--pressure", type=float, help="`pressure` workload: heads' tokens as a multiple of one "
                    "replica's KV cache (default 1.5; 0, as --quick: skip it)")
    ap.add_argument("--models", help="models of the throughput rows (default iris,minilm,smollm2; --quick "
                    "iris,smollm2)")
    ap.add_argument("--floor", help=f"floor.py variants, of {','.join(FLOOR_VARIANTS)} (default all; --quick "
                    "noop,ladle-iris)")
    ap.add_argument("--head-chars", type=int, default=1500, help="characters of each group's shared head")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"what to run, of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the hardware probe")
    ap.add_argument("--name", default="ray_scaling", help="write out/NAME.md, out/NAME.json, out/NAME-*.log")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite out/NAME.md from out/NAME.json")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.floor = [v.strip() for v in args.floor.split(",") if v.strip()]
    if set(args.models) - {IRIS, EMBEDDER, LLM} or set(args.floor) - set(FLOOR_VARIANTS):
        ap.error(f"--models: of {IRIS},{EMBEDDER},{LLM}; --floor: of {','.join(FLOOR_VARIANTS)}")
    if set(args.parts) - set(PARTS) or not args.parts:
        ap.error(f"--parts: choose from {', '.join(PARTS)}")
    return args


def ray_phase(address: str, args: argparse.Namespace, doc: dict[str, Any], clock: quant.Clock) -> None:
    log = OUT / f"{args.name}-ray.log"
    prefix_done = False
    if "ray" in args.parts:
        for replicas in (1, 2):
            for model in args.models:
                label = f"ray, {replicas} replica{'s' if replicas > 1 else ''}"
                command = ray_command(address, replicas, model)
                with server(command, log, clock, model, replicas) as (spawned, ready_s):
                    doc["servers"].append({"server": label, "model": model, "command": shown(command),
                                           "ready_s": spawned.ready_s, "replicas_ready_s": ready_s})
                    if model == LLM and replicas == 2 and "prefix" in args.parts:  # on fresh replicas: first
                        doc["prefix"] += prefix_runs(spawned.url, "prefix", args, doc, clock)
                        prefix_done = True
                    doc["rows"] += measure_model(spawned.url, model, args, clock, label, spawned.process.pid)
    if "prefix" in args.parts and not prefix_done:
        with server(ray_command(address, 2, LLM), log, clock, LLM, 2) as (spawned, _):
            doc["prefix"] += prefix_runs(spawned.url, "prefix", args, doc, clock)
    if "prefix" in args.parts:
        command = ray_command(address, 2, LLM, "--llm-routing", "power-of-two")
        with server(command, log, clock, LLM, 2) as (spawned, _):
            doc["servers"].append({"server": "ray, 2 replicas, power-of-two", "model": LLM, "command": shown(command)})
            doc["prefix"] += prefix_runs(spawned.url, "power-of-two", args, doc, clock)
    if "floor" in args.parts:
        doc["floor"] = floor(address, clock, args)
    if "ingress" in args.parts:
        command = [sys.executable, str(HERE / "ingress.py"), str(REPO), "--model", IRIS, "--address", address]
        with server(command, OUT / f"{args.name}-ingress.log", clock) as (spawned, _):
            doc["servers"].append({"server": "(B) Serve ingress", "model": IRIS, "command": shown(command),
                                   "ready_s": spawned.ready_s})
            doc["rows"] += measure_model(spawned.url, IRIS, args, clock, "(B) Serve ingress, 1 replica",
                                          spawned.process.pid)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the servers and the cluster too
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.report_only:
        doc = orjson.loads((OUT / f"{args.name}.json").read_bytes())
        report.summarize(doc)
        (OUT / f"{args.name}.md").write_text(report.markdown(doc) + "\n")
        print(report.markdown(doc))
        return
    clock = quant.Clock()
    OUT.mkdir(parents=True, exist_ok=True)
    for log in OUT.glob(f"{args.name}-*.log"):
        log.write_bytes(b"")
    if not quant.GGUF.exists():
        subprocess_build()
    host = quant.machine()
    clock.say(quant.describe_machine(host))
    quant.gguf_config()  # saves the GGUF's tokenizer for the bench client once
    (OUT / "iris-request.json").write_bytes(orjson.dumps(IRIS_BODY))
    clock.say("measuring the hardware ...")
    hw = hardware.measure(args.threads)
    clock.say(hardware.describe(hw))
    doc: dict[str, Any] = {"machine": host, "hardware": hw, "argv": argv, "args": vars(args).copy(),
                           "command": f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cluster/ray_scaling.py "
                                      f"{shlex.join(argv)}".rstrip(), "rows": [], "prefix": [], "servers": []}
    with tempfile.TemporaryDirectory(prefix="lrb-", dir="/tmp") as tmp:  # short: Ray's socket paths live under it
        doc["tmp"] = tmp
        os.environ["RAY_TMPDIR"] = tmp  # the servers' Ray drivers too: nothing of this run under /tmp/ray
        if "direct" in args.parts or "prefix" in args.parts:
            log = OUT / f"{args.name}-direct.log"
            command = ladle_command(*(f"--load-model={m}" for m in (IRIS, EMBEDDER, LLM)))
            with server(command, log, clock) as (spawned, _):
                doc["servers"].append({"server": "direct", "command": shown(command), "ready_s": spawned.ready_s})
                doc["kv_capacity_tokens"] = kv_capacity_tokens(log)
                if "direct" in args.parts:
                    for model in args.models:
                        doc["rows"] += measure_model(spawned.url, model, args, clock, "direct", spawned.process.pid)
        if set(args.parts) & {"ray", "prefix", "floor", "ingress"}:
            port = free_port()
            clock.say(f"starting a local Ray cluster: 2 nodes x 1 CPU, GCS port {port}, temp dir {tmp} ...")
            try:
                with local_cluster(port, Path(tmp), OUT / f"{args.name}-cluster.log") as address:
                    clock.say(f"Ray cluster at {address}")
                    doc["ray_address"] = f"127.0.0.1:{port}"
                    ray_phase(f"127.0.0.1:{port}", args, doc, clock)
                clock.say("Ray cluster stopped")
            finally:
                doc["ray_error_lines"] = ray_errors(tmp, OUT / f"{args.name}-ray-errors.log")
    doc["seconds"] = time.perf_counter() - clock.started
    report.summarize(doc)
    text = report.markdown(doc)
    (OUT / f"{args.name}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
    (OUT / f"{args.name}.md").write_text(text + "\n")
    print(text)


def subprocess_build() -> None:
    print(f"{quant.GGUF.relative_to(ROOT)} is missing: running examples/build_demo.py ...", file=sys.stderr)
    subprocess.run([sys.executable, str(ROOT / "examples" / "build_demo.py")], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
