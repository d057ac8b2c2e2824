"""Per-token cost of ladle's two incremental detokenizers: StreamDetokenizer (tokenizers' DecodeStream, Rust) vs
WindowDetokenizer (the same window algorithm in Python), one token per push as the engine streams, plus the cost of
starting a request (its prompt context). Median of 5 runs; single-threaded, so it measures CPU cost, not the box.

    .venv/bin/python benchmarks/micro/detokenizer.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ladle.llm.detokenizer import StreamDetokenizer, WindowDetokenizer  # noqa: E402
from ladle.llm.tokenizer import Tokenizer  # noqa: E402
from tests.fixtures.tiny_tokenizer import CORPUS, save_tiny_tokenizer  # noqa: E402

SMOLLM_LIKE = ROOT / "benchmarks" / "llm" / "out" / "smollm-135m-random"  # built by benchmarks/llm/run.py
RUNS, TOKENS = 5, 20_000


def tokenizers(tmp: Path) -> dict[str, tuple[Tokenizer, str]]:
    tiny_text = " ".join(CORPUS)
    found = {kind: (Tokenizer.from_dir(save_tiny_tokenizer(tmp / kind, kind=kind)), tiny_text)
             for kind in ("bytelevel", "metaspace")}
    if not (SMOLLM_LIKE / "tokenizer.json").exists():
        sys.path.insert(0, str(ROOT / "benchmarks" / "llm"))
        from run import build_tokenizer  # the 32k byte-level BPE the LLM benchmark uses (~1 min to train)

        build_tokenizer(tmp / "smollm")
    smollm_dir = SMOLLM_LIKE if (SMOLLM_LIKE / "tokenizer.json").exists() else tmp / "smollm"
    sys.path.insert(0, str(ROOT / "benchmarks" / "llm"))
    from run import _corpus

    found["bytelevel-32k (SmolLM-like)"] = (Tokenizer.from_dir(smollm_dir), " ".join(_corpus(4000, seed=1)))
    return found


def per_token_ns(cls: type, tok: Tokenizer, prompt: list[int], ids: list[int]) -> float:
    detok = cls(tok, prompt)
    started = time.perf_counter_ns()
    for token in ids:
        detok.push((token,))
    detok.flush()
    return (time.perf_counter_ns() - started) / len(ids)


def start_us(cls: type, tok: Tokenizer, prompt: list[int], repeat: int = 2000) -> float:
    started = time.perf_counter_ns()
    for _ in range(repeat):
        cls(tok, prompt).push(prompt[-1:])  # DecodeStream decodes its prefill on the first step: count it
    return (time.perf_counter_ns() - started) / repeat / 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("| tokenizer | vocab | per token: DecodeStream | per token: Python window | start of a request: "
              "DecodeStream | start: window |")
        print("|---|---|---|---|---|---|")
        for name, (tok, text) in tokenizers(Path(tmp)).items():
            ids = (tok.encode(text, add_special_tokens=False) * (TOKENS // 100))[:TOKENS]
            prompt = tok.encode("User: tell me a story.\nAssistant:")
            stream = statistics.median(per_token_ns(StreamDetokenizer, tok, prompt, ids) for _ in range(RUNS))
            window = statistics.median(per_token_ns(WindowDetokenizer, tok, prompt, ids) for _ in range(RUNS))
            s_start = statistics.median(start_us(StreamDetokenizer, tok, prompt) for _ in range(RUNS))
            w_start = statistics.median(start_us(WindowDetokenizer, tok, prompt) for _ in range(RUNS))
            print(f"| {name} | {tok.vocab_size} | {stream / 1000:.2f} µs | {window / 1000:.2f} µs | "
                  f"{s_start:.1f} µs | {w_start:.1f} µs |", flush=True)


if __name__ == "__main__":
    main()
