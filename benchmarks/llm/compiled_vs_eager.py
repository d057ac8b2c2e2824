"""ladle's torch.compile'd decoder against its eager one, through the server: two `ladle serve` of the random
SmolLM-135M-shaped checkpoint (vs_vllm.py's settings) run at once, one compiled (measured once its background compile
finished) and one with --enforce-eager; every cell (dtype x concurrency) is measured on each in turn, for several
rounds (the order reversing every other round: quant.round_order), keeping each server's better round. This box
drifts by 10-20% within minutes, so sequential runs of one server and then the other cannot tell a 1.1x apart from
noise; alternating cells can. `--engines ladle,vllm` (with `--vllm-venv`, vs_vllm.py's recipe) puts vLLM-CPU in the
second seat: the same alternation, ladle against vLLM. The host's ceiling (vs_vllm.py's, issue 16) is measured
before and after the servers, and the first engine's best round of each cell is reported against it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm/compiled_vs_eager.py [--dtype float32 --dtype bfloat16]
        [--concurrency 1,8,32] [--rounds 2] [--engines ladle,ladle-eager] [--vllm-venv /work/vllm-venv]
        [--kv-cache-dtype fp8]

Writes out/compiled_vs_eager.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import hardware  # noqa: E402
import quant  # noqa: E402
import run as llm  # noqa: E402
import vs_vllm  # noqa: E402


def measure(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    servers: list[dict] = []
    for dtype in args.dtypes:
        with contextlib.ExitStack() as stack:
            spawned = {}
            for engine in args.engines:
                log = llm.OUT / f"compiled_vs_eager-server-{engine}-{dtype}.log"
                print(f"starting {engine} ({dtype}); log: {log.relative_to(llm.ROOT)} ...", flush=True)
                spawned[engine] = stack.enter_context(vs_vllm.server(engine, dtype, args.vllm_venv, log))
                servers.append({"engine": engine, "dtype": dtype, "ready_s": spawned[engine].ready_s,
                                "compile_s": spawned[engine].compile_s})
            for round_ in range(args.rounds):
                for concurrency in args.concurrencies:
                    for engine in (args.engines[i] for i in quant.round_order(len(args.engines), round_)):
                        row = vs_vllm.measure_one(spawned[engine], engine, dtype, concurrency,
                                                  max(4, 2 * concurrency), min(concurrency, 8), round_)
                        rows.append({**row, "round": round_})
    return rows, servers


def markdown(rows: list[dict], servers: list[dict], doc: dict[str, Any]) -> str:
    top, (first, second) = quant.best_rounds(rows, "engine", "dtype", "concurrency"), doc["engines"]
    lines = [f"| dtype | c | {first} tok/s | {second} tok/s | {first} / {second} | {first} of the ceiling | "
             f"{first} TPOT ms | {first} of weight-read TPOT | {second} TPOT ms | "
             f"every round: {first} / {second} tok/s | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    config = orjson.loads((llm.MODEL_DIR / "config.json").read_bytes())
    hw = vs_vllm.best_hardware(doc)
    for (engine, dtype, c), r in top.items():
        if engine != first:
            continue
        e = top[(second, dtype, c)]
        costs = vs_vllm.model_costs(config, dtype)
        ceiling = vs_vllm.ceiling_tok_s(costs, hw, dtype, c)
        read_ms = costs.weight_bytes / (hw["bandwidth_gbs"] * 1e9) * 1e3
        read_share = f"{read_ms / r['mean_tpot_ms']:.0%} of {read_ms:.1f}" if c == 1 else "-"
        rounds = " ; ".join(
            f"{a['output_tok_s']:.1f} / {b['output_tok_s']:.1f}"
            for a, b in zip(*([x for x in rows if x["engine"] == name and x["dtype"] == dtype
                               and x["concurrency"] == c] for name in doc["engines"]), strict=True))
        lines.append(f"| {dtype} | {c} | {r['output_tok_s']:.1f} | {e['output_tok_s']:.1f} | "
                     f"{r['output_tok_s'] / e['output_tok_s']:.2f}x | {r['output_tok_s'] / ceiling:.0%} of "
                     f"{ceiling:,.0f} | {r['mean_tpot_ms']:.1f} | {read_share} | "
                     f"{e['mean_tpot_ms']:.1f} | {rounds} | {llm._load(r)} / {llm._load(e)} |")
    lines += ["", "| server | dtype | ready after s | compiled after ready s |", "|---|---|---:|---:|"]
    lines += [f"| {s['engine']} | {s['dtype']} | {s['ready_s']:.1f} | {vs_vllm._num(s['compile_s'], '.1f')} |"
              for s in servers]
    lines += ["", f"{quant.describe_machine(doc['machine'])}. Best of {doc['rounds']} rounds per cell; 128 in / 128 "
              "out, ignore_eos, `ladle bench serve`; both servers up at once, cells alternating.",
              f"Hardware before the servers: {hardware.describe(doc['hardware'])}; after: "
              f"{hardware.describe(doc['hardware_after'])}. The ceiling and weight-read TPOT: vs_vllm.py's, from the "
              "better of the two (mean TPOT)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", action="append", choices=("float32", "bfloat16"))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="ladle,ladle-eager",
                    help="two of ladle, ladle-eager, ladle-no-amx, vllm; the first is compared with the second")
    ap.add_argument("--vllm-venv", type=Path, default=Path(os.devnull), help="vLLM-CPU's virtualenv (vs_vllm.py)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="for both servers (e.g. fp8: vLLM's and ladle's name)")
    args = ap.parse_args()
    vs_vllm.KV_CACHE_DTYPE = args.kv_cache_dtype
    args.engines = args.engines.split(",")
    if len(args.engines) != 2 or not set(args.engines) <= set(vs_vllm.ENGINES):
        ap.error(f"--engines: two of {', '.join(vs_vllm.ENGINES)}")
    args.dtypes = args.dtype or ["float32"]
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    llm.OUT.mkdir(parents=True, exist_ok=True)
    llm.ensure_checkpoint()
    doc: dict[str, Any] = {"machine": quant.machine(), "rounds": args.rounds, "engines": args.engines,
                           "kv_cache_dtype": args.kv_cache_dtype}
    print(quant.describe_machine(doc["machine"]), flush=True)
    doc["hardware"] = hardware.measure(len(os.sched_getaffinity(0)))
    print(hardware.describe(doc["hardware"]), flush=True)
    rows, servers = measure(args)
    doc["hardware_after"] = hardware.measure(len(os.sched_getaffinity(0)))
    print(hardware.describe(doc["hardware_after"]), flush=True)
    doc |= {"rows": rows, "servers": servers, "ladle_command": vs_vllm.ladle_command("DTYPE")}
    (llm.OUT / "compiled_vs_eager.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    table = markdown(rows, servers, doc)
    (llm.OUT / "compiled_vs_eager.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
