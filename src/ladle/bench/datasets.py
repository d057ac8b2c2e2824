"""Workloads of `ladle bench serve`: random, sharegpt, prefix and custom prompts, sampled as vLLM's `vllm bench serve`.

Invariant: every synthetic prompt round-trips through the tokenizer (encode(prompt) gives back exactly the ids it was
decoded from), so its token count is what the server will see; sampling depends only on the seed and the arguments.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROUND_TRIP_RETRIES = 10  # as vLLM: decode/re-encode/trim-or-pad at most this many times, then accept the mismatch
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048  # vLLM's ShareGPT pruning limits


class DatasetError(ValueError):
    """The workload cannot be built: missing file or tokenizer, wrong format, impossible lengths."""


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send: `prompt` on /v1/completions; on chat, `messages` when the dataset has several (the prefix
    dataset's shared system prompt, then the user's part), else `prompt` as the one user message."""

    prompt: str
    prompt_len: int | None  # tokens the server should count (special tokens included); None without a tokenizer
    expected_output_len: int
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs


class BenchTokenizer:
    """A local Hugging Face tokenizer directory; encode/decode go to the Rust backend when there is one (fast)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer  # heavy import, paid only when a dataset needs token counts

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise DatasetError(f"--tokenizer {path}: cannot load a Hugging Face tokenizer ({exc})") from None
        self.backend = getattr(self.hf, "backend_tokenizer", None)
        self.vocab_size: int = self.hf.vocab_size
        self.special_ids: frozenset[int] = frozenset(self.hf.all_special_ids)
        self.num_special: int = len(self.encode("", add_special_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(list(ids), skip_special_tokens=False)
        return self.hf.decode(list(ids))

    def count(self, text: str, add_special_tokens: bool = False) -> int:
        return len(self.encode(text, add_special_tokens))

    def allowed_ids(self) -> np.ndarray:
        """Every non-special id: random prompts never contain BOS/EOS or chat markers."""
        return np.array(sorted(set(range(self.vocab_size)) - self.special_ids), dtype=np.int64)

    def clean_ids(self) -> np.ndarray:
        """Allowed ids that decode to whole characters and re-encode to themselves: padding with these converges,
        where a partial UTF-8 byte would decode to U+FFFD and re-encode as three tokens."""
        allowed = self.allowed_ids()
        texts = [self.decode([int(i)]) for i in allowed]
        clean = [i for i, text in zip(allowed, texts, strict=True)
                 if text and "\ufffd" not in text and self.encode(text) == [i]]
        return np.array(clean, dtype=np.int64) if clean else allowed


def fit_to_length(tok: BenchTokenizer, ids: list[int], target: int, rng: np.random.Generator,
                  pad: np.ndarray) -> tuple[str, list[int]]:
    """Decode, re-encode, then trim or pad with random `pad` ids until re-encoding gives `target` ids.

    Returns (text, encode(text)): the pair always round-trips; its length is `target` unless the retries ran out.
    """
    for attempt in range(ROUND_TRIP_RETRIES + 1):
        text = tok.decode(ids)
        ids = tok.encode(text)
        if len(ids) == target or attempt == ROUND_TRIP_RETRIES:
            break
        missing = target - len(ids)
        ids = ids + pad[rng.integers(0, len(pad), missing)].tolist() if missing > 0 else ids[:target]
    return text, ids


def _length_range(mean: int, ratio: float, floor_at: int) -> tuple[int, int]:
    """vLLM's uniform integer range around a mean: [floor(mean(1-r)), ceil(mean(1+r))], both >= floor_at."""
    return max(math.floor(mean * (1 - ratio)), floor_at), max(math.ceil(mean * (1 + ratio)), floor_at)


def sample_random(tok: BenchTokenizer, num: int, input_len: int, output_len: int, range_ratio: float,
                  prefix_len: int, seed: int) -> list[SampleRequest]:
    """vLLM's random dataset: lengths uniform around the means, then consecutive ids from a random offset (after a
    fixed random prefix), fitted so the server counts `input_len` prompt tokens (its special ones included). Ids are
    drawn from the tokens that round-trip alone (vLLM draws from every non-special id, which rarely converges)."""
    if not 0.0 <= range_ratio < 1.0:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    real_input = max(0, input_len - tok.num_special)  # the server adds BOS & co. itself
    in_low, in_high = _length_range(real_input, range_ratio, 0)
    out_low, out_high = _length_range(output_len, range_ratio, 1)
    if prefix_len + in_low < 1:
        raise DatasetError(f"--random-input-len {input_len} leaves no token after {tok.num_special} special ones")
    input_lens = rng.integers(in_low, in_high + 1, size=num)
    output_lens = rng.integers(out_low, out_high + 1, size=num)
    offsets = rng.integers(0, tok.vocab_size, size=num)
    ids = tok.clean_ids()  # whole-character tokens: a partial UTF-8 byte would re-encode as three tokens
    prefix = ids[rng.integers(0, len(ids), size=prefix_len)].tolist()
    requests = []
    for i in range(num):
        inner = ids[(offsets[i] + i + np.arange(input_lens[i])) % len(ids)].tolist()
        text, fitted = fit_to_length(tok, prefix + inner, prefix_len + int(input_lens[i]), rng, ids)
        requests.append(SampleRequest(text, len(fitted) + tok.num_special, int(output_lens[i])))
    return requests


def sample_prefix(tok: BenchTokenizer, num: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                  output_len: int, seed: int) -> list[SampleRequest]:
    """vLLM's prefix_repetition: `num_prefixes` random shared prefixes (the system prompt), each request adding its own
    random suffix. Request i uses prefix i % num_prefixes, so every group is equally large and none is dropped."""
    if num_prefixes < 1 or prefix_len < 0 or suffix_len < 1:
        raise DatasetError("prefix dataset needs --prefix-repetition-num-prefixes >= 1 and suffix length >= 1")
    rng = np.random.default_rng(seed)
    clean = tok.clean_ids()  # whole-character tokens: the shared prefix keeps its length wherever it is joined

    def exact(length: int) -> list[int]:
        return fit_to_length(tok, clean[rng.integers(0, len(clean), size=length)].tolist(), length, rng, clean)[1]

    prefixes = [exact(prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num):
        prefix, suffix = prefixes[i % num_prefixes], exact(suffix_len)
        joined = tok.decode(prefix + suffix)  # as vLLM: one decode, so the boundary reads as it would in running text
        messages = (("system", tok.decode(prefix)), ("user", tok.decode(suffix)))
        requests.append(SampleRequest(joined, tok.count(joined, True), output_len, messages))
    return requests


def sample_sharegpt(tok: BenchTokenizer, path: Path, num: int, output_len: int | None,
                    seed: int) -> list[SampleRequest]:
    """vLLM's ShareGPT: first human turn as the prompt; the reply's token count is the output length unless
    --sharegpt-output-len; pairs too short or too long are skipped; shuffled by the seed, oversampled when short."""
    entries = [e for e in _read_json(path) if isinstance(e, dict) and len(e.get("conversations") or []) >= 2]
    random.Random(seed).shuffle(entries)
    requests = []
    for entry in entries:
        if len(requests) >= num:
            break
        prompt, reply = (str(turn.get("value", "")) for turn in entry["conversations"][:2])
        prompt_len = tok.count(prompt, add_special_tokens=True)
        out_len = tok.count(reply, add_special_tokens=True) if output_len is None else output_len
        too_short = prompt_len < SHAREGPT_MIN_LEN or (output_len is None and out_len < SHAREGPT_MIN_LEN)
        if too_short or prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + out_len > SHAREGPT_MAX_TOTAL:
            continue
        requests.append(SampleRequest(prompt, prompt_len, out_len))
    if not requests:
        raise DatasetError(f"--dataset-path {path}: no usable ShareGPT conversation (need >= 2 turns, 4..1024 tokens)")
    return oversample(requests, num, seed)


def sample_custom(tok: BenchTokenizer | None, path: Path, num: int, output_len: int,
                  seed: int) -> list[SampleRequest]:
    """vLLM's custom dataset: a JSONL file of {"prompt": ...} lines, shuffled by the seed, oversampled when short."""
    rows = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise DatasetError(f"--dataset-path {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DatasetError(f"--dataset-path {path}, line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DatasetError(f"--dataset-path {path}, line {number}: expected an object with a string 'prompt'")
        rows.append(row["prompt"])
    if not rows:
        raise DatasetError(f"--dataset-path {path}: no prompts")
    random.Random(seed).shuffle(rows)
    requests = [SampleRequest(p, None if tok is None else tok.count(p, True), output_len) for p in rows[:num]]
    return oversample(requests, num, seed)


def oversample(requests: list[SampleRequest], num: int, seed: int) -> list[SampleRequest]:
    """Repeat randomly chosen requests until there are `num` (vLLM does the same when a file is short)."""
    chooser = random.Random(seed)
    return requests + [chooser.choice(requests) for _ in range(num - len(requests))]


def _read_json(path: Path) -> list[Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise DatasetError(f"--dataset-path {path}: cannot read JSON ({exc})") from None
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of {{'conversations': [...]}} entries")
    return data
