"""Per-request records of `ladle bench serve` and the summary computed from them alone, with vLLM's names and
definitions: TTFT/E2EL = first/last token chunk - send, ITL = gaps between chunks, TPOT = (E2EL - TTFT) / (out - 1),
goodput = successful requests within every SLO per second, percentiles as numpy.percentile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ladle.bench.stats import summarize

METRICS: dict[str, tuple[str, str]] = {  # key -> (short name, section header), as vLLM prints them
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


@dataclass
class RequestRecord:
    """What one measured request did; times in seconds, `start_s` from the start of the measured phase."""

    index: int
    expected_output_len: int
    prompt_len: int | None = None
    start_s: float = 0.0
    success: bool = False
    status: int = 0  # HTTP status; 0 when no response came
    error: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    output_len: int = 0
    output_len_source: str = ""  # "usage" (server), "tokenizer" (re-tokenized text) or "chunks" (chunk count)
    generated_text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output_len - 1); None when one token or fewer (vLLM leaves those out of TPOT)."""
        if not self.success or self.output_len <= 1 or self.latency_s is None or self.ttft_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tpot_s": self.tpot_s}


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=200,tpot=50' (ms; ':' and spaces also accepted, as vLLM's --goodput) -> {'ttft': 200.0, 'tpot': 50.0}."""
    slo: dict[str, float] = {}
    for pair in (text or "").replace(",", " ").split():
        name, sep, value = pair.replace(":", "=").partition("=")
        try:
            slo[name.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"--slo: cannot read {pair!r}; write e.g. ttft=200,tpot=50 (milliseconds)") from None
        if not sep or name.strip().lower() not in ("ttft", "tpot", "e2el") or float(value) < 0:
            raise ValueError(f"--slo: {pair!r}: names are ttft, tpot and e2el; values are milliseconds >= 0")
    return slo


def is_good(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A successful request within every SLO; TPOT counts as 0 for one-token outputs (as in vLLM)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.latency_s}
    return all(values[name] is not None and values[name] * 1e3 <= limit for name, limit in slo.items())


def series(records: list[RequestRecord], metric: str) -> list[float]:
    """A metric's values (seconds) over the successful requests; ITL is every gap of every request."""
    ok = [r for r in records if r.success]
    if metric == "itl":
        return [gap for r in ok for gap in r.itl_s]
    values = {"ttft": [r.ttft_s for r in ok], "tpot": [r.tpot_s for r in ok], "e2el": [r.latency_s for r in ok]}
    return [v for v in values[metric] if v is not None]


def _per_second(count: float, duration: float) -> float:
    return count / duration if duration > 0 else 0.0


def summarize_run(records: list[RequestRecord], duration: float, slo: dict[str, float],
                  percentiles: tuple[float, ...]) -> dict[str, Any]:
    """vLLM's result keys: completed, failed, totals, throughputs, mean/median/std/pNN of each metric in ms."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len or 0 for r in ok)
    total_out = sum(r.output_len for r in ok)
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(records) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": _per_second(len(ok), duration),
        "request_goodput": _per_second(sum(is_good(r, slo) for r in ok), duration) if slo else None,
        "output_throughput": _per_second(total_out, duration),
        "total_token_throughput": _per_second(total_in + total_out, duration),
    }
    for metric in METRICS:
        stats = summarize(series(records, metric), percentiles)
        values = {"mean": stats.mean, "median": stats.median, "std": stats.std}
        values.update({f"p{q:g}": stats.percentiles[q] for q in percentiles})
        for name, value in values.items():
            summary[f"{name}_{metric}_ms"] = None if math.isnan(value) else value * 1e3
    return summary


def _line(label: str, value: Any) -> str:
    shown = f"{value:.2f}" if isinstance(value, float) else "-" if value is None else str(value)
    return f"{label:<40} {shown:<10}"


def format_report(summary: dict[str, Any], *, max_concurrency: int | None, request_rate: float,
                  metrics: tuple[str, ...], percentiles: tuple[float, ...], interrupted: bool = False) -> str:
    """The report `vllm bench serve` prints, line for line (plus 'interrupted' when Ctrl-C cut the run short)."""
    title = " Serving Benchmark Result " + ("(interrupted) " if interrupted else "")
    lines = [f"{title:=^50}", _line("Successful requests:", summary["completed"]),
             _line("Failed requests:", summary["failed"])]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if request_rate != math.inf:
        lines.append(_line("Request rate configured (RPS):", float(request_rate)))
    lines += [
        _line("Benchmark duration (s):", summary["duration"]),
        _line("Total input tokens:", summary["total_input_tokens"]),
        _line("Total generated tokens:", summary["total_output_tokens"]),
        _line("Request throughput (req/s):", summary["request_throughput"]),
    ]
    if summary["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s):", summary["request_goodput"]))
    lines += [_line("Output token throughput (tok/s):", summary["output_throughput"]),
              _line("Total Token throughput (tok/s):", summary["total_token_throughput"])]
    for metric in metrics:
        name, header = METRICS[metric]
        lines += [f"{header:-^50}", _line(f"Mean {name} (ms):", summary[f"mean_{metric}_ms"]),
                  _line(f"Median {name} (ms):", summary[f"median_{metric}_ms"])]
        lines += [_line(f"P{q:g} {name} (ms):", summary[f"p{q:g}_{metric}_ms"]) for q in percentiles]
    lines.append("=" * 50)
    return "\n".join(lines)
