"""The classic benchmark: req/s and p50/p99 latency of iris and minilm over KServe v2 at concurrency 1, 8 and 64,
for ladle with and without dynamic batching and for a bare Starlette floor (bare_server.py); plus the cold start
of `ladle serve examples/models`. Servers are subprocesses; the load comes from `ladle bench infer` in this process.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classic/run.py   (writes benchmarks/classic/out/)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import yaml
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/spawn.py
from spawn import spawned_server  # noqa: E402

from ladle.bench import InferBenchConfig  # noqa: E402
from ladle.bench.infer import run as run_bench  # noqa: E402

DEMO = ROOT / "examples/models"
TARGETS = ("ladle, batching", "ladle, no batching", "bare floor")


# -- servers ----------------------------------------------------------------------------------------
@contextmanager
def server(command: list[str], log: Path) -> Iterator[tuple[str, float]]:
    """Spawn a server on a free port; yield (base URL, seconds from spawn to ready); stop it after."""
    with spawned_server(command, log) as spawned:
        yield spawned.url, spawned.ready_s


def ladle_command(repository: Path) -> list[str]:
    return [sys.executable, "-m", "ladle", "serve", str(repository), "--log-level", "warning"]


def bare_command(models: list[str], torch_threads: int | None) -> list[str]:
    threads = [] if torch_threads is None else ["--torch-threads", str(torch_threads)]
    return [sys.executable, str(HERE / "bare_server.py"), "--models", *models, *threads]


# -- repositories -----------------------------------------------------------------------------------
def build_demo() -> None:
    """Make sure examples/models has its artifacts (examples/build_demo.py is idempotent)."""
    spec = importlib.util.spec_from_file_location("build_demo", ROOT / "examples/build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(DEMO, log=lambda _message: None)


def build_repository(root: Path, models: list[str], batching: bool, torch_threads: int | None = None) -> Path:
    """A copy of the demo's models (iris: only its ONNX version 2), with dynamic_batching dropped if asked
    and, if given, minilm's torch thread count set (`parameters.num_threads`)."""
    for name in models:
        source, target = DEMO / name, root / name
        target.mkdir(parents=True)
        config = yaml.safe_load((source / "config.yaml").read_text())
        if not batching:
            config.pop("dynamic_batching", None)
        if torch_threads is not None and name == "minilm":
            config.setdefault("parameters", {})["num_threads"] = torch_threads
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        version = "2" if name == "iris" else "1"
        shutil.copytree(source / version, target / version)
    return root


# -- measuring --------------------------------------------------------------------------------------
def measure(url: str, model: str, concurrency: int, duration: float) -> dict:
    config = InferBenchConfig(url=url, model=model, concurrency=concurrency, duration=duration,
                              warmup=max(20, 2 * concurrency), progress=False, seed=0)
    result = run_bench(config)
    summary = result.summary()
    latency = summary["latency_ms"]
    return {"rps": summary["throughput_rps"], "p50_ms": latency["p50"], "p99_ms": latency["p99"],
            "requests": summary["requests"], "errors": summary["errors"],
            "error_samples": {str(status): text for status, text in result.error_samples.items()}}


def run_matrix(args: argparse.Namespace, workdir: Path, log: Path) -> list[dict]:
    """Every (target, model, concurrency) cell; one server per target, each cell a fresh bench."""
    threads = args.torch_threads
    commands = {
        TARGETS[0]: ladle_command(build_repository(workdir / "batching", args.models, True, threads)),
        TARGETS[1]: ladle_command(build_repository(workdir / "no-batching", args.models, False, threads)),
        TARGETS[2]: bare_command(args.models, threads),
    }
    rows = []
    cells = len(commands) * len(args.models) * len(args.concurrency)
    with tqdm(total=cells, unit="run", desc="classic", file=sys.stderr) as bar:
        for target, command in commands.items():
            bar.set_postfix_str(f"starting {target}")
            with server(command, log) as (url, _):
                for model in args.models:
                    for concurrency in args.concurrency:
                        bar.set_postfix_str(f"{target} {model} c={concurrency}")
                        cell = measure(url, model, concurrency, args.duration)
                        rows.append({"target": target, "model": model, "concurrency": concurrency, **cell})
                        bar.update()
    return rows


def cold_start(repeats: int, log: Path) -> dict:
    """Seconds from spawning `ladle serve examples/models` to /v2/health/ready answering 200."""
    times = []
    for _ in tqdm(range(repeats), desc="cold start", unit="start", file=sys.stderr):
        with server(ladle_command(DEMO), log) as (_, seconds):
            times.append(seconds)
    return {"runs_s": times, "median_s": statistics.median(times)}


# -- reporting --------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    packages = ("torch", "onnxruntime", "sentence-transformers", "uvicorn", "starlette", "aiohttp")
    versions = {package: importlib.metadata.version(package) for package in packages}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions,
            "load_average": os.getloadavg()}


def _cell(rows: list[dict], target: str, model: str, concurrency: int) -> dict | None:
    return next((r for r in rows if (r["target"], r["model"], r["concurrency"]) == (target, model, concurrency)), None)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, concurrency), req/s · p50 · p99 for each target side by side."""
    head = "| model | conc. | " + " | ".join(f"{t}: req/s · p50 · p99 (ms)" for t in TARGETS) + " |"
    lines = [head, "|" + "---|" * (2 + len(TARGETS))]
    for model in dict.fromkeys(r["model"] for r in rows):
        for concurrency in sorted({r["concurrency"] for r in rows if r["model"] == model}):
            cells = []
            for target in TARGETS:
                r = _cell(rows, target, model, concurrency)
                errors = f" ({sum(r['errors'].values())} errors)" if r and r["errors"] else ""
                cells.append("-" if r is None else
                             f"{r['rps']:.0f} · {r['p50_ms']:.1f} · {r['p99_ms']:.1f}{errors}")
            lines.append(f"| {model} | {concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against this run's figures."""
    out = []
    bare = _cell(rows, TARGETS[2], "iris", 1)
    for target in TARGETS[:2]:
        cell = _cell(rows, target, "iris", 1)
        if bare and cell:
            ratio = cell["p50_ms"] / bare["p50_ms"]
            out.append(f"iris c=1, {target}: p50 {cell['p50_ms']:.2f} ms vs floor {bare['p50_ms']:.2f} ms = "
                       f"{ratio:.2f}x (target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")
    batched, unbatched, floor = (_cell(rows, t, "minilm", 64) for t in TARGETS)
    if batched and unbatched and floor:
        gain = batched["rps"] / unbatched["rps"]
        out.append(f"minilm c=64: batching {batched['rps']:.0f} req/s = {gain:.1f}x unbatched "
                   f"{unbatched['rps']:.0f} (target >= 3x): {'met' if gain >= 3 else 'NOT met'}")
        out.append(f"minilm c=64: batching {batched['rps']:.0f} req/s vs floor {floor['rps']:.0f} req/s "
                   f"(target: above): {'met' if batched['rps'] > floor['rps'] else 'NOT met'}")
    return out


def write_outputs(out_dir: Path, document: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classic.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    cold = document["cold_start"]
    markdown = [f"Command: `{document['command']}`", "", table(document["rows"]), "",
                f"Cold start (`ladle serve examples/models` to ready): median {cold['median_s']:.2f} s "
                f"of {', '.join(f'{t:.2f}' for t in cold['runs_s'])}", "", *(f"- {v}" for v in document["verdicts"])]
    (out_dir / "classic.md").write_text("\n".join(markdown) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["iris", "minilm"], choices=["iris", "minilm"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of measured load per cell")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold-start repeats (median reported)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="minilm's torch intra-op threads, in ladle (parameters.num_threads) and the floor alike "
                        "(default: the demo config's, i.e. torch's own choice)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    build_demo()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "servers.log"
    log.write_bytes(b"")
    document = {"command": " ".join(["python", "benchmarks/classic/run.py", *(argv or sys.argv[1:])]),
                "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ladle-classic-") as workdir:
        document["rows"] = run_matrix(args, Path(workdir), log)
    document["cold_start"] = cold_start(args.cold_starts, log)
    document["verdicts"] = verdicts(document["rows"])
    document["machine"]["load_average_after"] = os.getloadavg()
    write_outputs(args.out, document)
    print((args.out / "classic.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
