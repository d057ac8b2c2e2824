"""What traffic splits, sticky keys and shadow traffic cost the primary (issue 13): iris (ONNX version 2 serving,
the scikit-learn version 1 as the shadow candidate) over KServe v2 at concurrency 1 and 8, for the demo config on
the code of `--base-ref` (default: before issue 13), the same config now, a split with a sticky key, and shadow
copies of 10% and 100% of the requests. Rounds alternate the servers so drift hits all alike; medians are reported.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classic/rollout_paths.py   (writes benchmarks/classic/out/)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import httpx
import orjson
import yaml
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/spawn.py, benchmarks/classic/run.py
from classic.run import build_demo, ladle_command, machine, measure  # noqa: E402
from spawn import spawned_server  # noqa: E402

from ladle.serving import traffic  # noqa: E402

DEMO = ROOT / "examples/models"
VARIANTS = {  # name -> config.yaml fields over the demo's iris config
    "base ref (--base-ref)": {},
    "now: no split": {},
    "split {2: 100} + sticky_key": {"traffic_split": {2: 100}, "sticky_key": "X-User-Id"},
    "shadow 10% to version 1": {"traffic_split": {2: 100}, "shadow": {"version": 1, "fraction": 0.1}},
    "shadow 100% to version 1": {"traffic_split": {2: 100}, "shadow": {"version": 1, "fraction": 1.0}},
}


def repository(root: Path, fields: dict) -> Path:
    target = root / "iris"
    shutil.copytree(DEMO / "iris", target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    (target / "config.yaml").write_text(yaml.safe_dump({**config, **fields}, sort_keys=False))
    return root


def base_checkout(ref: str, where: Path) -> Path:
    """The source tree of `ref` (git archive: no worktree bookkeeping left behind)."""
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where / "src"


def run_round(name: str, root: Path, log: Path, concurrency: list[int], duration: float,
              base_src: Path) -> list[dict]:
    env_before = os.environ.get("PYTHONPATH")
    if name.startswith("base ref"):
        os.environ["PYTHONPATH"] = str(base_src)  # the spawned server imports the base ref's ladle
    try:
        with spawned_server(ladle_command(root), log) as spawned:
            rows = [{"variant": name, "concurrency": c, **measure(spawned.url, "iris", c, duration)}
                    for c in concurrency]
            if "shadow" in name:
                rows[-1]["shadow"] = httpx.get(spawned.url + "/v2/models/iris/shadow").json()["counts"]
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in VARIANTS:
        for c in sorted({r["concurrency"] for r in rows}):
            cells = [r for r in rows if r["variant"] == name and r["concurrency"] == c]
            out.append({"variant": name, "concurrency": c,
                        **{k: statistics.median(r[k] for r in cells) for k in ("rps", "p50_ms", "p99_ms")},
                        "errors": sum(sum(r["errors"].values()) for r in cells),
                        "shadow": next((r["shadow"] for r in reversed(cells) if "shadow" in r), None)})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| variant | conc. | req/s | p50 ms | p99 ms | p50 vs now: no split | shadow counts (last round) |",
             "|---|---|---|---|---|---|---|"]
    for row in summary:
        ref = next(r for r in summary if r["variant"] == "now: no split" and r["concurrency"] == row["concurrency"])
        shadow = "" if row["shadow"] is None else ", ".join(f"{k} {v}" for k, v in row["shadow"].items())
        lines.append(f"| {row['variant']} | {row['concurrency']} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['p50_ms'] / ref['p50_ms']:.2f}x | {shadow} |")
    return "\n".join(lines)


def sticky_cost_us() -> float:
    """One weighted-rendezvous pick between two versions with a key, in microseconds."""
    split = ((1, 90.0), (2, 10.0))
    calls = 20000
    return min(timeit.repeat(lambda: traffic.choose(split, (1, 2), "user-12345"), number=calls, repeat=5)) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-ref", default="75d2e98", help="git ref of the code before issue 13")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    build_demo()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "rollout_paths.log"
    log.write_bytes(b"")
    document = {"command": " ".join(["python", "benchmarks/classic/rollout_paths.py", *(argv or sys.argv[1:])]),
                "machine": machine(), "sticky_pick_us": sticky_cost_us()}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ladle-rollout-paths-") as work:
        work_dir = Path(work)
        base_src = base_checkout(args.base_ref, work_dir)
        repos = {name: repository(work_dir / f"repo{i}", fields) for i, (name, fields) in enumerate(VARIANTS.items())}
        with tqdm(total=args.rounds * len(VARIANTS), unit="server", desc="rollout paths", file=sys.stderr) as bar:
            for round_index in range(args.rounds):
                names = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
                for name in names:
                    bar.set_postfix_str(name)
                    rows += run_round(name, repos[name], log, args.concurrency, args.duration, base_src)
                    bar.update()
    document["rows"] = rows
    document["summary"] = summarize(rows)
    document["machine"]["load_average_after"] = os.getloadavg()
    (args.out / "rollout_paths.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    markdown = f"Command: `{document['command']}`\n\n{table(document['summary'])}\n\n" \
               f"One sticky pick (weighted rendezvous, two versions): {document['sticky_pick_us']:.2f} µs\n"
    (args.out / "rollout_paths.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
