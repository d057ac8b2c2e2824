"""ray_scaling.py's report: the targets judged on the measured rows, and the markdown tables."""

from __future__ import annotations

from typing import Any

import hardware
import quant

DIRECT, RAY1, RAY2, INGRESS = "direct", "ray, 1 replica", "ray, 2 replicas", "(B) Serve ingress, 1 replica"
COLUMNS = (DIRECT, RAY1, RAY2, INGRESS)
TARGET_OVERHEAD_MS = 1.0  # p50 added per iris request by the front end + Ray, against a single ladle
TARGET_HITS = 2.0  # prefix-aware routing's prefix-cache hits over power-of-two's
FLOOR_TARGETS = {"noop": "a no-op deployment (Serve's router)", "noop-ladle-router": "a no-op deployment, LadleRouter",
                 "ladle-iris": "ladle's iris replica via Cluster.call (no HTTP)"}


def one_line(row: dict[str, Any]) -> str:
    if "output_tok_s" in row:
        text = f"{row['output_tok_s']:.1f} out tok/s ({row['req_s']:.2f} req/s), e2e p99 {row['p99_ms']:.0f} ms"
    else:
        text = f"{row['req_s']:.1f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
    split = row.get("per_replica_requests")
    if split and len(split) > 1:
        text += ", per replica " + "/".join(f"{v:.0f}" for v in split.values())
    return f"c={row['concurrency']}: {text}, other load {row['other_load']:.2f}"


def cell(doc: dict[str, Any], server: str, model: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in doc["rows"] if r["server"] == server and r["model"] == model
                 and r["concurrency"] == concurrency), None)


def summarize(doc: dict[str, Any]) -> None:
    targets = []
    direct, ray1 = cell(doc, DIRECT, "iris", 1), cell(doc, RAY1, "iris", 1)
    overhead = {}
    for server in (RAY1, RAY2, INGRESS):
        row = cell(doc, server, "iris", 1)
        if direct and row:
            overhead[server] = {"p50_ms": row["p50_ms"] - direct["p50_ms"], "p99_ms": row["p99_ms"] - direct["p99_ms"]}
    doc["overhead"] = overhead
    if direct and ray1:
        added = overhead[RAY1]["p50_ms"]
        targets.append({"name": "iris: p50 added by (A) ladle serve --ray (1 replica) over a single ladle",
                        "target": f"< {TARGET_OVERHEAD_MS:g} ms", "measured": f"{added:.2f} ms "
                        f"({ray1['p50_ms']:.2f} vs {direct['p50_ms']:.2f} ms)", "met": added < TARGET_OVERHEAD_MS})
    ratios = {}
    for scenario in dict.fromkeys(r["scenario"] for r in doc["prefix"]):
        by = {r["routing"]: r for r in doc["prefix"] if r["scenario"] == scenario}
        if {"prefix", "power-of-two"} <= set(by):
            p, q = by["prefix"], by["power-of-two"]
            ratios[scenario] = {"usage": _ratio(p["cached_tokens"], q["cached_tokens"]),
                                "counters": _ratio(p["metrics_hit_tokens"], q["metrics_hit_tokens"])}
            r = ratios[scenario]["usage"]
            targets.append({"name": f"prefix-cache hits, prefix-aware vs power-of-two, `{scenario}` workload "
                            f"({p['groups']} groups)", "target": f">= {TARGET_HITS:g}x",
                            "measured": f"{r:.2f}x ({p['cached_tokens']:,} vs {q['cached_tokens']:,} cached tokens)",
                            "met": r >= TARGET_HITS})
    doc["hit_ratios"] = ratios
    doc["targets"] = targets


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def scaling_table(doc: dict[str, Any]) -> list[str]:
    c = doc["args"]["concurrency"]
    present = [s for s in COLUMNS if any(r["server"] == s for r in doc["rows"])]
    lines = ["| measure | " + " | ".join(present) + " | 2 vs 1 replica |", "|---|" + "---:|" * (len(present) + 1)]
    specs = [("iris", 1, "p50 / p99 ms, sequential", lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", None),
             ("iris", c, f"req/s at c={c}", lambda r: f"{r['req_s']:,.0f}", "req_s"),
             ("iris", c, f"p99 ms at c={c}", lambda r: f"{r['p99_ms']:.1f}", None),
             ("minilm", c, f"req/s at c={c} (/v1/embeddings)", lambda r: f"{r['req_s']:,.1f}", "req_s"),
             ("minilm", c, f"p99 ms at c={c}", lambda r: f"{r['p99_ms']:.0f}", None),
             ("smollm2", c, f"output tok/s at c={c} (/v1/completions)", lambda r: f"{r['output_tok_s']:,.1f}",
              "output_tok_s"),
             ("smollm2", c, f"request p99 ms at c={c}", lambda r: f"{r['p99_ms']:,.0f}", None)]
    for model, conc, what, fmt, key in specs:
        cells = [cell(doc, s, model, conc) for s in present]
        if not any(cells):
            continue
        one, two = cell(doc, RAY1, model, conc), cell(doc, RAY2, model, conc)
        scale = f"{two[key] / one[key]:.2f}x" if key and one and two else "-"
        lines.append(f"| {model} {what} | " + " | ".join(fmt(x) if x else "-" for x in cells) + f" | {scale} |")
    return lines


def rows_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| server | model | c | requests | seconds | req/s | p50 ms | p99 ms | out tok/s | requests per replica "
             "| CPU ms per request: server · replicas · proxy · rest of Ray · client | other load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in doc["rows"]:
        split = r.get("per_replica_requests") or {}
        lines.append(f"| {r['server']} | {r['model']} | {r['concurrency']} | {r['requests']:,} | {r['seconds']:.1f} | "
                     f"{r['req_s']:,.1f} | {_f(r.get('p50_ms'), '.2f')} | {r['p99_ms']:,.1f} | "
                     f"{_f(r.get('output_tok_s'), ',.1f')} | "
                     f"{' / '.join(f'{v:.0f}' for v in split.values()) if split else '-'} | {_cpu(r)} | "
                     f"{r['other_load']:.2f} |")
    return lines


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_ms_per_request") or {}
    return " · ".join(_f(cpu.get(role), ".2f") for role in ("server", "replicas", "proxy", "ray", "client"))


def prefix_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| workload | routing | groups x rounds | requests | prompt tokens | cached (usage) | hit rate (usage) | "
             "hit rate (counters) | prompt tokens per replica | seconds | other load |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in doc["prefix"]:
        per = " / ".join(f"{v:,.0f}" for v in r["prompt_tokens_per_replica"].values())
        lines.append(f"| {r['scenario']} | {r['routing']} | {r['groups']} x {r['rounds']} | {r['requests']} | "
                     f"{r['prompt_tokens']:,} | {r['cached_tokens']:,} | {r['hit_rate_usage']:.1%} | "
                     f"{r['hit_rate_metrics']:.1%} | {per} | {r['seconds']:.1f} | {r['other_load']:.2f} |")
    for scenario, ratio in doc.get("hit_ratios", {}).items():
        lines.append(f"| {scenario} | **prefix / power-of-two** | | | | **{ratio['usage']:.2f}x** | | "
                     f"{ratio['counters']:.2f}x (hit tokens) | | | |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    a = doc["args"]
    lines = ["## Scaling out on Ray (`benchmarks/cluster/ray_scaling.py`)", "",
             f"Machine: {quant.describe_machine(doc['machine'])}; {hardware.describe(doc['hardware'])}.",
             "Ray: a local cluster of two nodes of 1 CPU each (ray.cluster_utils in a helper process); every (A) "
             "replica reserves 1 CPU. Other load: CPU s/s taken by processes outside this run (2 cores in all).", ""]
    if doc["rows"]:
        lines += ["### Throughput and latency", "", *scaling_table(doc), "", "All rows:", "", *rows_table(doc), ""]
    if doc.get("overhead"):
        lines += ["Added per iris request against the direct ladle (sequential, p50 / p99): " + "; ".join(
            f"{k} {v['p50_ms']:+.2f} / {v['p99_ms']:+.2f} ms" for k, v in doc["overhead"].items()) + ".", ""]
    if doc.get("floor"):
        lines += ["Where (A)'s per-request cost goes (floor.py; calls through a deployment handle from an asyncio "
                  "driver, 1 replica of 1 CPU):", "",
                  "| called | Serve settings | sequential p50 / p99 ms | calls/s at c="
                  f"{doc['floor'][0]['concurrency']} |",
                  "|---|---|---:|---:|"]
        lines += [f"| {FLOOR_TARGETS.get(f['target'], f['target'])} | {f['settings']} | {f['p50_ms']:.2f} / "
                  f"{f['p99_ms']:.2f} | {f['calls_s']:,.0f} |" for f in doc["floor"]]
        a1 = cell(doc, RAY1, "iris", 1)
        if a1:
            lines.append(f"| iris over HTTP through ladle's front end = (A) | ladle's SERVE_ENV | {a1['p50_ms']:.2f} / "
                         f"{a1['p99_ms']:.2f} | {cell(doc, RAY1, 'iris', doc['args']['concurrency'])['req_s']:,.0f} "
                         "(HTTP requests/s) |")
        lines.append("")
    if doc["prefix"]:
        pressure = (f"; `pressure`: {doc['pressure_groups']} groups = {a['pressure']:g}x one replica's cache in heads"
                    if doc.get("pressure_groups") else "")
        lines += [f"### Prefix-cache hits: prefix-aware vs power-of-two routing (2 replicas, concurrency "
                  f"{doc['prefix'][0].get('concurrency', 4)}, max_tokens 4)", "",
                  f"One replica's KV cache: {_f(doc.get('kv_capacity_tokens'), ',')} tokens; mean prompt "
                  f"{doc.get('head_tokens', 0):.0f} tokens (head ~{a['head_chars']} chars + a question). `fits`: "
                  f"{a['prefix_groups']} groups{pressure}.", "", *prefix_table(doc), ""]
    if doc["targets"]:
        lines += ["Targets:", ""]
        lines += [f"- {t['name']} {t['target']}: {t['measured']}, {'met' if t['met'] else 'NOT met'}"
                  for t in doc["targets"]]
        lines.append("")
    lines += ["Commands:", "", "```", doc["command"], *dict.fromkeys(s["command"] for s in doc["servers"]), "```", "",
              f"Total {doc['seconds']:.0f} s; {doc.get('ray_error_lines', 0)} error lines in the Ray session's logs "
              "(out/NAME-ray-errors.log)."]
    return "\n".join(lines)
