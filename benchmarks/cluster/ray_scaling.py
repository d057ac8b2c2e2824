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
- Each phase records the CPU time other processes took meanwhile (other load, CPU s/s: 2 cores in all).

The cluster: ray.cluster_utils.Cluster in a helper process (local_cluster.py), private temp dir, stopped at the end
whatever happens. Writes out/ray_scaling.md and out/ray_scaling.json (--name) and prints the tables.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cluster/ray_scaling.py [--quick] [--duration 15]
        [--seq-duration 10] [--llm-duration 20] [--concurrency 8] [--prefix-groups 8] [--prefix-rounds 6]
        [--pressure 1.5] [--parts direct,ray,prefix,ingress]

--quick: short phases and fewer prefix rounds (a smoke run, 2-3 minutes of measuring plus server start-ups).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import signal
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
PREFIX_MAX_TOKENS, PREFIX_CONCURRENCY = 4, 4
FULL = dict(duration=15.0, seq_duration=10.0, llm_duration=20.0, prefix_rounds=6, pressure_rounds=4)
QUICK = dict(duration=4.0, seq_duration=3.0, llm_duration=6.0, prefix_rounds=3, pressure_rounds=2)
PARTS = ("direct", "ray", "prefix", "ingress")


# -- servers -----------------------------------------------------------------------------------------------------------
def ladle_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "ladle", "serve", str(REPO), "--log-level", "info", *extra]


def ray_command(address: str, replicas: int, model: str, *extra: str) -> list[str]:
    return ladle_command("--ray", address, "--replicas", str(replicas), "--num-cpus", "1", "--load-model", model,
                         *extra)


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
    started = time.perf_counter() - spawned.ready_s
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        samples = pw.scrape(spawned.url)
        labels = {dict(k[1]).get("replica") for k in samples if dict(k[1]).get("replica")}
        if pw.replicas(samples, model) >= count and len(labels) >= count:
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
def measured(work: Any) -> dict[str, Any]:
    """work() with the other load of the box over it (CPU s/s of processes outside this run's tree)."""
    with foreign_cpu() as other:
        row = work()
    row["other_load"] = other["foreign_cpu_s"] / other["phase_s"]
    return row


@contextlib.contextmanager
def foreign_cpu() -> Any:
    """llm.foreign_cpu over every process this run started (servers, the Ray nodes and their workers)."""
    before = {pid: llm._cpu_s(pid) for pid in _tree(os.getpid())}
    box, started = llm._box_busy_s(), time.perf_counter()
    out: dict[str, float] = {}
    yield out
    after = {}
    for pid in _tree(os.getpid()) | set(before):
        with contextlib.suppress(OSError, IndexError, ValueError):
            after[pid] = llm._cpu_s(pid)
    own = sum(after[p] - before.get(p, 0.0) for p in after)
    out["foreign_cpu_s"] = max(0.0, llm._box_busy_s() - box - own)
    out["phase_s"] = time.perf_counter() - started


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
                  seq: bool = True) -> list[dict[str, Any]]:
    c = args.concurrency
    before = pw.scrape(url) if "ray" in label or "(B)" in label else None
    rows = []
    if model == IRIS:
        if seq:
            clock.say(f"{label}: iris sequential, {args.seq_duration:.0f} s ...")
            rows.append(measured(lambda: iris_load(url, 1, args.seq_duration)))
        clock.say(f"{label}: iris at concurrency {c}, {args.duration:.0f} s ...")
        rows.append(measured(lambda: iris_load(url, c, args.duration)))
    elif model == EMBEDDER:
        clock.say(f"{label}: minilm /v1/embeddings at concurrency {c}, {args.duration:.0f} s ...")
        rows.append(measured(lambda: minilm_load(url, c, args.duration)))
    else:
        clock.say(f"{label}: smollm2 /v1/completions at concurrency {c}, ~{args.llm_duration:.0f} s ...")
        rows.append(measured(lambda: llm_load(url, c, args.llm_duration)))
    if before is not None:  # how the requests spread over the replicas
        after = pw.scrape(url)
        name = "ladle_llm_requests_total" if model == LLM else "ladle_model_requests_total"
        split = pw.delta_by_replica(before, after, name, model)
        for row in rows:
            row["per_replica_requests"] = split
    for row in rows:
        row["server"] = label
        clock.say(f"{label}: {report.one_line(row)}")
    return rows


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
    ap.add_argument("--pressure-rounds", type=int, help="requests per group, `pressure` (default 4; --quick 2)")
    ap.add_argument("--pressure", type=float, default=1.5, help="`pressure` workload: heads' tokens as a multiple "
                    "of one replica's KV cache (0: skip it)")
    ap.add_argument("--head-chars", type=int, default=1500, help="characters of each group's shared head")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"what to run, of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the hardware probe")
    ap.add_argument("--name", default="ray_scaling", help="write out/NAME.md, out/NAME.json, out/NAME-*.log")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(args.parts) - set(PARTS) or not args.parts:
        ap.error(f"--parts: choose from {', '.join(PARTS)}")
    return args


def ray_phase(address: str, args: argparse.Namespace, doc: dict[str, Any], clock: quant.Clock) -> None:
    log = OUT / f"{args.name}-ray.log"
    if "ray" in args.parts:
        for replicas in (1, 2):
            for model in (IRIS, EMBEDDER, LLM):
                label = f"ray, {replicas} replica{'s' if replicas > 1 else ''}"
                command = ray_command(address, replicas, model)
                with server(command, log, clock, model, replicas) as (spawned, ready_s):
                    doc["servers"].append({"server": label, "model": model, "command": shown(command),
                                           "ready_s": spawned.ready_s, "replicas_ready_s": ready_s,
                                           "replica_env": replica_env(doc["tmp"])})
                    if model == LLM and replicas == 2 and "prefix" in args.parts:
                        doc["prefix"] += prefix_runs(spawned.url, "prefix", args, doc, clock)
                    doc["rows"] += measure_model(spawned.url, model, args, clock, label)
    elif "prefix" in args.parts:
        with server(ray_command(address, 2, LLM), log, clock, LLM, 2) as (spawned, _):
            doc["prefix"] += prefix_runs(spawned.url, "prefix", args, doc, clock)
    if "prefix" in args.parts:
        command = ray_command(address, 2, LLM, "--llm-routing", "power-of-two")
        with server(command, log, clock, LLM, 2) as (spawned, _):
            doc["servers"].append({"server": "ray, 2 replicas, power-of-two", "model": LLM, "command": shown(command)})
            doc["prefix"] += prefix_runs(spawned.url, "power-of-two", args, doc, clock)
    if "ingress" in args.parts:
        command = [sys.executable, str(HERE / "ingress.py"), str(REPO), "--model", IRIS, "--address", address]
        with server(command, OUT / f"{args.name}-ingress.log", clock) as (spawned, _):
            doc["servers"].append({"server": "(B) Serve ingress", "model": IRIS, "command": shown(command),
                                   "ready_s": spawned.ready_s})
            doc["rows"] += measure_model(spawned.url, IRIS, args, clock, "(B) Serve ingress, 1 replica")


def replica_env(tmp: str) -> list[dict[str, Any]]:
    """OMP_NUM_THREADS and thread counts of this run's Serve replica processes (found by our RAY_TMPDIR)."""
    out = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not entry.name.isdigit() or b"ServeReplica" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            if env.get(b"RAY_TMPDIR", b"").decode() != tmp:
                continue
            threads = sum(1 for _ in (entry / "task").iterdir())
            out.append({"pid": int(entry.name), "cmd": (entry / "cmdline").read_bytes().split(b"\0")[0].decode(),
                        "OMP_NUM_THREADS": env.get(b"OMP_NUM_THREADS", b"").decode() or None, "threads": threads})
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the servers and the cluster too
    argv = sys.argv[1:]
    args = parse_args(argv)
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
                    for model in (IRIS, EMBEDDER, LLM):
                        doc["rows"] += measure_model(spawned.url, model, args, clock, "direct")
        if set(args.parts) & {"ray", "prefix", "ingress"}:
            port = free_port()
            clock.say(f"starting a local Ray cluster: 2 nodes x 1 CPU, GCS port {port}, temp dir {tmp} ...")
            with local_cluster(port, Path(tmp), OUT / f"{args.name}-cluster.log") as address:
                clock.say(f"Ray cluster at {address}")
                doc["ray_address"] = f"127.0.0.1:{port}"
                ray_phase(f"127.0.0.1:{port}", args, doc, clock)
            clock.say("Ray cluster stopped")
    doc["seconds"] = time.perf_counter() - clock.started
    report.summarize(doc)
    text = report.markdown(doc)
    (OUT / f"{args.name}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
    (OUT / f"{args.name}.md").write_text(text + "\n")
    print(text)


def subprocess_build() -> None:
    import subprocess

    print(f"{quant.GGUF.relative_to(ROOT)} is missing: running examples/build_demo.py ...", file=sys.stderr)
    subprocess.run([sys.executable, str(ROOT / "examples" / "build_demo.py")], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
