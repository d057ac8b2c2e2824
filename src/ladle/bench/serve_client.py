"""The streaming client of `ladle bench serve`: request bodies, SSE decoding, and one request folded into its record.

Invariant: a token event is timed when the network read that carried it returned (as vLLM does), so
E2EL = TTFT + sum(ITL) for every successful record; counts come from the server's usage when it sends one.
"""

from __future__ import annotations

import time
from typing import Any

# aiohttp, not httpx: streaming 8192 SSE chunks from a local server (16 in flight) on this 2-core box cost ~21 us
# of client CPU per chunk with aiohttp (iter_any) vs ~55-60 us with httpx (aiter_raw), parsing included. The client
# shares the cores with the server it measures, so its CPU per token is taken from the server's throughput.
import aiohttp
import orjson

from ladle.bench.datasets import BenchTokenizer, SampleRequest
from ladle.bench.serve_metrics import RequestRecord

ERROR_CHARS = 300  # enough of an error body to say what went wrong, short enough for a report line


def build_payload(sample: SampleRequest, model: str, chat: bool, temperature: float, ignore_eos: bool,
                  extra: dict[str, Any]) -> bytes:
    """An OpenAI request body streaming with usage; chat sends both max-token spellings (servers differ)."""
    n = sample.expected_output_len
    body: dict[str, Any] = {"model": model, "temperature": temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if chat:
        messages = [{"role": role, "content": text} for role, text in sample.messages or (("user", sample.prompt),)]
        body.update(messages=messages, max_tokens=n, max_completion_tokens=n)
    else:
        body.update(prompt=sample.prompt, max_tokens=n)
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra)
    return orjson.dumps(body)


class SSEDecoder:
    """Server-sent events from arbitrary byte chunks: yields each event's data (multi-line data joined by \\n)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")  # a lone trailing \r waits in the buffer for its \n
        *events, self._buffer = buffer.split(b"\n\n")
        return [data for data in map(_event_data, events) if data is not None]

    def close(self) -> list[bytes]:
        """The last event when the stream ended without its blank line."""
        data, self._buffer = _event_data(self._buffer.rstrip(b"\r\n")), b""
        return [] if data is None else [data]


def _event_data(event: bytes) -> bytes | None:
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None  # comments (":" pings) and empty events carry no data


def token_piece(choice: dict[str, Any], chat: bool) -> str | None:
    """The text one streamed choice carries, or None when it is not a token event.

    Completions: every choice chunk is one (as in vLLM). Chat: a chunk with neither content nor a finish_reason is
    the role announcement that OpenAI-style servers send before generating, so it must not stop the TTFT clock.
    """
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    content = delta.get("content") or delta.get("reasoning_content") or ""
    return content if content or choice.get("finish_reason") is not None else None


class StreamFold:
    """Folds one response's events into timings, text and usage."""

    def __init__(self, chat: bool, start: float) -> None:
        self.chat, self.start = chat, start
        self.first: float | None = None
        self.last = start
        self.itl: list[float] = []
        self.parts: list[str] = []
        self.usage: dict[str, Any] = {}
        self.error = ""

    def on_event(self, data: bytes, now: float) -> bool:
        """Take one event; True when the stream is over ([DONE] or an error event)."""
        if data == b"[DONE]":
            return True
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error = f"not JSON in the event stream: {data[:ERROR_CHARS]!r}"
            return True
        if not isinstance(event, dict):
            return False
        if event.get("error"):
            self.error = f"error event: {orjson.dumps(event['error']).decode()[:ERROR_CHARS]}"
            return True
        choices = event.get("choices")
        piece = token_piece(choices[0], self.chat) if choices else None
        if piece is not None:
            if self.first is None:
                self.first = now
            else:
                self.itl.append(now - self.last)
            self.last = now
            self.parts.append(piece)
        if event.get("usage"):
            self.usage = event["usage"]
        return False

    def into(self, record: RequestRecord, tok: BenchTokenizer | None) -> None:
        record.generated_text = "".join(self.parts)
        if self.error or self.first is None:
            record.error = self.error or "the stream ended before any token arrived"
            return
        record.success = True
        record.ttft_s, record.latency_s, record.itl_s = self.first - self.start, self.last - self.start, self.itl
        completion, prompt = self.usage.get("completion_tokens"), self.usage.get("prompt_tokens")
        if isinstance(completion, int) and completion > 0:
            record.output_len, record.output_len_source = completion, "usage"
        elif tok is not None:
            record.output_len, record.output_len_source = tok.count(record.generated_text), "tokenizer"
        else:
            record.output_len, record.output_len_source = len(self.parts), "chunks"
        if isinstance(prompt, int):
            record.prompt_len = prompt


async def stream_request(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                         record: RequestRecord, chat: bool, t0: float, tok: BenchTokenizer | None) -> None:
    """Send one streaming request and fill `record`; never raises for a failed request (it is recorded)."""
    start = time.perf_counter()
    record.start_s = start - t0
    fold = StreamFold(chat, start)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            record.status = response.status
            if response.status != 200:
                text = (await response.read())[:ERROR_CHARS].decode("utf-8", "replace")
                record.error = f"HTTP {response.status}: {text}"
                return
            await _read_events(response, fold)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        fold.error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    fold.into(record, tok)


async def _read_events(response: aiohttp.ClientResponse, fold: StreamFold) -> None:
    decoder = SSEDecoder()
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        for data in decoder.feed(chunk):
            if fold.on_event(data, now):
                return
    now = time.perf_counter()
    for data in decoder.close():
        if fold.on_event(data, now):
            return
